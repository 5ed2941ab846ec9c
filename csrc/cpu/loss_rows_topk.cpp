// CPU implementation of smskd_fast::smskd_loss_rows_topk (schema in csrc/ops.cpp):
// the fused per-row loss with the teacher in the top-k form of a logit cache
// (the math: smskd_fast/backends/topk.py). Argument checks, the kept classes sorted by
// index per row (checked distinct and in range on the way), output allocation,
// and the choice of the SIMD kernel (loss_rows_topk_kernel_impl.h) for the
// instruction set that this CPU supports.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "loss_rows_host.h"
#include "topk_op_checks.h"

namespace smskd::cpu {
namespace {

using TopKKernel = void (*)(const LossRowsArgs&, const TopKTeacherView&);

constexpr const char* kOp = "smskd_loss_rows_topk";

TopKKernel select_kernel() {
  switch (kernel_isa()) {
#if SMSKD_CPU_X86_VARIANTS
    case KernelIsa::Avx512: return &AVX512::loss_rows_topk_kernel;
    case KernelIsa::Avx2: return &AVX2::loss_rows_topk_kernel;
#endif
    default: return &DEFAULT::loss_rows_topk_kernel;
  }
}

void check_rows(const char* name, const at::Tensor& tensor, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(tensor.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(tensor.device().is_cpu(), kOp, ": ", name, " must be on the CPU, got ", tensor.device());
}

void check_floating(const char* name, const at::Tensor& tensor) {
  TORCH_CHECK_TYPE(at::isFloatingType(tensor.scalar_type()), kOp, ": ", name, " must be a floating tensor, got ",
                   tensor.scalar_type());
}

// Each row's kept classes sorted by index, with their values alongside; refused unless
// in [0, classes) and distinct (a repeated class would count its probability twice).
// indices: int64, values: the accumulation type, both (rows, k) and contiguous. Rows
// whose target (int64 per row, or null) is ignore_index are left unread, as the kernel
// skips them: a cache's padding may hold anything. Serial: O(N k log k) is small beside
// the kernel's O(N C), and a parallel region would cost more than it saves (waiting
// for threads on a busy machine).
std::pair<at::Tensor, at::Tensor> sorted_kept_classes(const at::Tensor& indices, const at::Tensor& values,
                                                      int64_t classes, const int64_t* target,
                                                      int64_t ignore_index) {
  const int64_t rows = indices.size(0), k = indices.size(1);
  at::Tensor sorted_indices = at::empty_like(indices), sorted_values = at::empty_like(values);
  std::vector<int64_t> order(k);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sorted_kept_classes", [&] {
    const int64_t* index = indices.const_data_ptr<int64_t>();
    const scalar_t* value = values.const_data_ptr<scalar_t>();
    int64_t* out_index = sorted_indices.data_ptr<int64_t>();
    scalar_t* out_value = sorted_values.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i, index += k, value += k, out_index += k, out_value += k) {
      if (target != nullptr && target[i] == ignore_index) continue;
      std::iota(order.begin(), order.end(), int64_t(0));
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return index[a] < index[b]; });
      for (int64_t c = 0; c < k; ++c) {
        out_index[c] = index[order[c]];
        out_value[c] = value[order[c]];
      }
      TORCH_CHECK_VALUE(out_index[0] >= 0 && out_index[k - 1] < classes, kOp, ": topk_indices must be in [0, ",
                        classes, "), got ", out_index[0] < 0 ? out_index[0] : out_index[k - 1], " in row ", i);
      for (int64_t c = 1; c < k; ++c)
        TORCH_CHECK_VALUE(out_index[c] != out_index[c - 1], kOp, ": topk_indices must be distinct within a row, row ",
                          i, " repeats class ", out_index[c]);
    }
  });
  return {sorted_indices, sorted_values};
}

LossRowsResult smskd_loss_rows_topk_cpu(const at::Tensor& student, const std::optional<at::Tensor>& target,
                                        const at::Tensor& topk_values, const at::Tensor& topk_indices,
                                        const at::Tensor& true_logit, const at::Tensor& log_sum_exp,
                                        const at::Tensor& log_sum_exp_at_temperature,
                                        const std::optional<at::Tensor>& reference, double temperature,
                                        double ce_weight, double kd_weight, double ref_weight,
                                        c10::string_view weighting, int64_t ignore_index, bool compute_grad,
                                        const std::optional<at::Tensor>& grad_scale, c10::string_view reduction) {
  check_student_and_temperature(student, temperature, kOp);
  LossRowsArgs args;
  args.kind = scalar_kind(student, kOp);
  args.rows = student.size(0);
  args.classes = student.size(1);
  const int64_t k = checked_topk_k(topk_values, args.rows, args.classes, kOp);
  check_rows("topk_values", topk_values, {args.rows, k});
  check_rows("topk_indices", topk_indices, {args.rows, k});
  check_rows("true_logit", true_logit, {args.rows});
  check_rows("log_sum_exp", log_sum_exp, {args.rows});
  check_rows("log_sum_exp_at_temperature", log_sum_exp_at_temperature, {args.rows});
  check_floating("topk_values", topk_values);
  check_floating("true_logit", true_logit);
  check_floating("log_sum_exp", log_sum_exp);
  check_floating("log_sum_exp_at_temperature", log_sum_exp_at_temperature);
  check_topk_indices_dtype(topk_indices, kOp);
  if (reference.has_value()) {
    check_rows("reference", *reference, student.sizes());
    TORCH_CHECK_TYPE(reference->scalar_type() == student.scalar_type(), kOp, ": reference must have the student's ",
                     "dtype ", student.scalar_type(), ", got ", reference->scalar_type());
  }
  args.weighting = parse_weighting(std::string(weighting), kOp);
  set_loss_scalars(args, temperature, ce_weight, kd_weight, ref_weight, ignore_index);
  at::Tensor target_long;
  if (target.has_value()) {
    target_long = checked_target(*target, args.rows, args.classes, ignore_index, kOp);
    args.target = target_long.const_data_ptr<int64_t>();
  }
  args.student = view_of(student);
  if (reference.has_value()) args.reference = view_of(*reference);

  const auto accumulation = accumulation_type(student);
  const auto as_acc = [&](const at::Tensor& t) { return t.to(accumulation).contiguous(); };
  const auto [sorted_indices, sorted_values] =
      sorted_kept_classes(topk_indices.to(at::kLong).contiguous(), as_acc(topk_values), args.classes, args.target,
                          ignore_index);
  const at::Tensor true_values = as_acc(true_logit), lse = as_acc(log_sum_exp),
                   lse_t = as_acc(log_sum_exp_at_temperature);
  TopKTeacherView teacher;
  teacher.k = k;
  teacher.sorted_indices = sorted_indices.const_data_ptr<int64_t>();
  teacher.sorted_values = sorted_values.const_data_ptr();
  teacher.true_logit = true_values.const_data_ptr();
  teacher.log_sum_exp = lse.const_data_ptr();
  teacher.log_sum_exp_at_temperature = lse_t.const_data_ptr();

  return run_reduced(args, student, target_long, compute_grad, grad_scale, ignore_index, reduction, kOp,
                     [&args, &teacher] { select_kernel()(args, teacher); });
}

}  // namespace
}  // namespace smskd::cpu

TORCH_LIBRARY_IMPL(smskd_fast, CPU, m) { m.impl("smskd_loss_rows_topk", &smskd::cpu::smskd_loss_rows_topk_cpu); }
