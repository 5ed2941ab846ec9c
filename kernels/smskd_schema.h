/* The operator's per-row outputs and weighting modes: the one C/C++ list that
 * the CPU operator (csrc/cpu), the CUDA operator (csrc/cuda), the CUDA kernels
 * (kernels/) and the schema strings of csrc/ops.cpp expand.
 *
 * Its Python twin is smskd_fast/ops/schema.py (PER_ROW_OUTPUTS, WEIGHTINGS);
 * tests/test_op_schema.py checks that the two lists agree, name for name and
 * code for code. No CUDA and no PyTorch here, so every translation unit (and
 * plain C) can include it.
 */
#ifndef SMSKD_SCHEMA_H_
#define SMSKD_SCHEMA_H_

#include <string.h>

/* The per-row outputs, in the operator's output order (the gradient follows
 * them in the functional ops). X(name) is expanded once per output; each is
 * one value per row in the accumulation type:
 *   loss = ce_weight*ce + kd_weight*kd + ref_weight*ref, the terms ce, kd,
 *   ref (= T^2 * w * KL), and the row's tcp and weight w. */
#define SMSKD_PER_ROW_OUTPUTS(X) X(loss) X(ce) X(kd) X(ref) X(tcp) X(weight)

/* The weighting modes of the reference term (SPEC.md section 1):
 * X(ENUM_SUFFIX, python_name, code). The code is the value of the C enum
 * smskd_weighting and of the Triton kernels' WEIGHTING constexpr. */
#define SMSKD_WEIGHTINGS(X)          \
  X(INVERSE_TCP, inverse_tcp, 0) /* w = 1 - TCP */ \
  X(TCP, tcp, 1)                 /* w = TCP */     \
  X(CONSTANT, constant, 2)       /* w = 1 */

#define SMSKD_SCHEMA_COUNT_ONE_(...) +1
/* How many per-row outputs the list has. */
enum { SMSKD_NUM_PER_ROW_OUTPUTS = 0 SMSKD_PER_ROW_OUTPUTS(SMSKD_SCHEMA_COUNT_ONE_) };

#define SMSKD_SCHEMA_WEIGHTING_ENUMERATOR_(suffix, name, code) SMSKD_WEIGHT_##suffix = code,
/* How the reference term's per-row weight w_i is computed. */
typedef enum { SMSKD_WEIGHTINGS(SMSKD_SCHEMA_WEIGHTING_ENUMERATOR_) } smskd_weighting;
#undef SMSKD_SCHEMA_WEIGHTING_ENUMERATOR_

#define SMSKD_SCHEMA_WEIGHTING_NAME_(suffix, name, code) #name,
/* The modes' names, indexed by their code. */
static const char* const smskd_weighting_names[] = {SMSKD_WEIGHTINGS(SMSKD_SCHEMA_WEIGHTING_NAME_)};
#undef SMSKD_SCHEMA_WEIGHTING_NAME_

#define SMSKD_SCHEMA_WEIGHTING_MATCH_(suffix, name, code) \
  if (strcmp(text, #name) == 0) {                         \
    *out = SMSKD_WEIGHT_##suffix;                         \
    return 1;                                             \
  }
/* Sets *out to the mode named text and returns 1, or returns 0 for an unknown name. */
static inline int smskd_weighting_from_name(const char* text, smskd_weighting* out) {
  SMSKD_WEIGHTINGS(SMSKD_SCHEMA_WEIGHTING_MATCH_)
  return 0;
}
#undef SMSKD_SCHEMA_WEIGHTING_MATCH_

#define SMSKD_SCHEMA_WEIGHTING_VALID_(suffix, name, code) || w == SMSKD_WEIGHT_##suffix
/* 1 when w is one of the modes. */
static inline int smskd_weighting_valid(smskd_weighting w) { return 0 SMSKD_WEIGHTINGS(SMSKD_SCHEMA_WEIGHTING_VALID_); }
#undef SMSKD_SCHEMA_WEIGHTING_VALID_

#endif /* SMSKD_SCHEMA_H_ */
