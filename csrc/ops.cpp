// Operator schemas of the smskd_fast library.
//
// Every compiled backend (CPU here, CUDA in csrc/cuda) implements these schemas
// with TORCH_LIBRARY_IMPL; the Python side (smskd_fast/ops/registration.py) adds the fake
// (meta) kernels and the autograd formula. The math is SPEC.md section 2.
#include <Python.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

#include "op_outputs.h"

#if __has_include(<smskd_fast_built_with_torch.h>)
#include <smskd_fast_built_with_torch.h>  // torch.__version__ at build time: setup.py writes it under build/
#else
#define SMSKD_FAST_BUILT_WITH_TORCH TORCH_VERSION  // other builds (CMake): torch's MAJOR.MINOR.PATCH
#endif

extern "C" {
// Importing smskd_fast._C loads this shared object, which runs the static
// TORCH_LIBRARY registrations below. The module's one member, BUILT_WITH_TORCH,
// is the torch it was compiled against: smskd_fast/ops/extension.py refuses the
// library under another minor release (PyTorch's C++ ABI changes between them),
// and a pre-release (nightly, source build) under any other torch.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "smskd_fast compiled operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "BUILT_WITH_TORCH", SMSKD_FAST_BUILT_WITH_TORCH) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

// The argument lists of the three operators. Their Python twin, with the
// output names, is smskd_fast/ops/schema.py; tests/test_op_schema.py checks
// that the schemas registered here equal the ones schema.py derives.
#define SMSKD_SCALAR_ARGS \
  "float temperature, float ce_weight, float kd_weight, float ref_weight, str weighting, int ignore_index"
// Optional, in every operator (before reduction): a 0-d tensor in the accumulation dtype on the
// student's device; the gradient written is grad_scale * d loss_i / d student_i
// (the mean's 1/n folded in, smskd_fast/ops/registration.py); per-row outputs are not scaled.
#define SMSKD_GRAD_SCALE_ARG "Tensor? grad_scale=None"
// After it: "none" (per-row outputs), "sum" or "mean" (loss, ce, kd and ref as 0-d sums over the
// rows, the mean's over the rows whose target is not ignore_index, and the gradient of that
// reduced loss; grad_scale must then be None). csrc/reduction_arg.h.
#define SMSKD_REDUCTION_ARG "str reduction=\"none\""

TORCH_LIBRARY(smskd_fast, m) {
  // The per-row outputs (kernels/smskd_schema.h), each of length N (loss, ce, kd and ref 0-d
  // under reduction "sum" / "mean") and in the accumulation dtype (float32, or float64 for float64 inputs):
  //   loss = ce_weight*ce + kd_weight*kd + ref_weight*ref, and the terms ce, kd,
  //   ref (= T^2 * w * KL), tcp and weight.
  const std::string per_row = smskd::per_row_schema_outputs();
  // Per-row fused loss over (N, C) logits: the per-row outputs, plus grad =
  // dloss_i/dstudent_i in the student's dtype, shape (N, C) when compute_grad
  // else (0, C). weighting is one of SMSKD_WEIGHTINGS; rows whose target equals
  // ignore_index give zeros everywhere.
  m.def(("smskd_loss_rows(Tensor student, Tensor? target, Tensor? teacher, Tensor? reference, " SMSKD_SCALAR_ARGS
         ", bool compute_grad, " SMSKD_GRAD_SCALE_ARG ", " SMSKD_REDUCTION_ARG ") -> (" + per_row +
         ", Tensor grad)").c_str());
  // The same loss and outputs with the teacher in the top-k form of a logit
  // cache (smskd_fast/backends/topk.py): per row its k largest logits (values, (N, k))
  // and their classes (indices, (N, k)), the true-class logit and the row's
  // log-sum-exp at T = 1 and at the loss temperature ((N,) each). TCP is exact;
  // KD is the coarsened KL (kept classes exact, the rest spread like the student).
  m.def(("smskd_loss_rows_topk(Tensor student, Tensor? target, Tensor topk_values, Tensor topk_indices, "
         "Tensor true_logit, Tensor log_sum_exp, Tensor log_sum_exp_at_temperature, Tensor? reference, "
         SMSKD_SCALAR_ARGS ", bool compute_grad, " SMSKD_GRAD_SCALE_ARG ", " SMSKD_REDUCTION_ARG ") -> (" + per_row +
         ", Tensor grad)").c_str());
  // The same loss with the gradient written over the student logits (a GPU
  // option, LossOptions.overwrite_student_logits): no N x C gradient buffer;
  // student's columns must be contiguous. Returns the per-row outputs.
  m.def(("smskd_loss_rows_inplace_(Tensor(a!) student, Tensor? target, Tensor? teacher, Tensor? reference, "
         SMSKD_SCALAR_ARGS ", " SMSKD_GRAD_SCALE_ARG ", " SMSKD_REDUCTION_ARG ") -> (" + per_row + ")").c_str());
}
