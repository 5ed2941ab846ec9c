// CPU implementation of smskd_fast::smskd_loss_rows_topk (schema in csrc/ops.cpp):
// the fused per-row loss with the teacher in the top-k form of a logit cache.
//
// The math is smskd_fast/topk.py: the kept classes' probabilities
// p_c = exp(v_c/T - lse_T) are exact, the rest's mass p_rest = 1 - sum p_c is
// spread like the student's q = softmax(s/T), so per row
//   KD = T^2 [sum_kept p_c (log p_c - log q_c) + p_rest (log p_rest - log q_rest)]
//   dKD/ds_j = T (q_j * (sum_kept p_c + p_rest) - p~_j),
// TCP = exp(true_logit - lse) is exact, and CE and the reference term are the
// dense ones. Rows are independent: at::parallel_for over rows, one scalar pass
// per row in the accumulation type (double for float64, float otherwise). Top-k
// rows hold few classes, so this form needs no SIMD kernel to be memory-bound
// on the student row.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace smskd::cpu {
namespace {

using TopKResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

enum class TopKWeighting { InverseTcp, Tcp, Constant };

struct TopKArgs {
  int64_t rows = 0, classes = 0, k = 0;
  const int64_t* target = nullptr;  // nullptr: no target (kd_loss)
  const int64_t* indices = nullptr;
  double temperature = 1.0, ce_weight = 0.0, kd_weight = 0.0, ref_weight = 0.0;
  TopKWeighting weighting = TopKWeighting::Constant;
  int64_t ignore_index = -100;
};

// log(sum exp(x_i)) of the values that `take` selects, with its own maximum; -inf when none.
template <typename acc_t, typename Take>
acc_t log_sum_exp_of(int64_t count, Take take) {
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    acc_t x;
    if (take(j, x)) top = std::max(top, x);
  }
  if (top == -std::numeric_limits<acc_t>::infinity()) return top;
  acc_t sum = 0;
  for (int64_t j = 0; j < count; ++j) {
    acc_t x;
    if (take(j, x)) sum += std::exp(x - top);
  }
  return top + std::log(sum);
}

template <typename scalar_t, typename acc_t>
void topk_rows_kernel(const TopKArgs& a, const scalar_t* student, const scalar_t* reference, const acc_t* values,
                      const acc_t* true_logit, const acc_t* lse, const acc_t* lse_t, std::array<acc_t*, 6> out,
                      scalar_t* grad) {
  const acc_t T = static_cast<acc_t>(a.temperature);
  const int64_t C = a.classes, K = a.k;
  at::parallel_for(0, a.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(C), log_q(C), p_tilde(C), log_r(C);
    std::vector<char> kept(C);
    for (int64_t i = begin; i < end; ++i) {
      const bool has_target = a.target != nullptr;
      const int64_t y = has_target ? a.target[i] : 0;
      scalar_t* grad_row = grad ? grad + i * C : nullptr;
      if (has_target && y == a.ignore_index) {
        for (auto* o : out) o[i] = 0;
        if (grad_row) std::fill(grad_row, grad_row + C, scalar_t(0));
        continue;
      }
      for (int64_t j = 0; j < C; ++j) s[j] = static_cast<acc_t>(student[i * C + j]);
      // CE = lse(s) - s_y, and log q = s/T - lse(s/T).
      const acc_t lse1 = log_sum_exp_of<acc_t>(C, [&](int64_t j, acc_t& x) { x = s[j]; return true; });
      const acc_t ce = has_target ? lse1 - s[y] : acc_t(0);
      const acc_t lse_q = log_sum_exp_of<acc_t>(C, [&](int64_t j, acc_t& x) { x = s[j] / T; return true; });
      for (int64_t j = 0; j < C; ++j) log_q[j] = s[j] / T - lse_q;
      // Kept classes: exact p_c, and their share of the KL.
      std::fill(kept.begin(), kept.end(), 0);
      std::fill(p_tilde.begin(), p_tilde.end(), acc_t(0));
      const acc_t* row_values = values + i * K;
      const int64_t* row_indices = a.indices + i * K;
      acc_t kept_kl = 0, kept_mass = 0;
      for (int64_t c = 0; c < K; ++c) {
        const acc_t log_p = row_values[c] / T - lse_t[i];
        const acc_t p = std::exp(log_p);
        const int64_t index = row_indices[c];
        kept[index] = 1;
        if (p > 0) {
          kept_kl += p * (log_p - log_q[index]);
          kept_mass += p;
          p_tilde[index] = p;
        }
      }
      // The rest's mass, spread like the student's probabilities over the rest.
      acc_t rest_kl = 0, rest_mass = 0;
      if (K < C) {
        const acc_t log_kept = log_sum_exp_of<acc_t>(K, [&](int64_t c, acc_t& x) {
          x = row_values[c] / T - lse_t[i];
          return true;
        });
        const acc_t p_rest = std::max(-std::expm1(log_kept), acc_t(0));
        if (p_rest > 0) {
          const acc_t log_q_rest = log_sum_exp_of<acc_t>(C, [&](int64_t j, acc_t& x) {
            x = log_q[j];
            return !kept[j];
          });
          rest_kl = p_rest * (std::log(p_rest) - log_q_rest);
          rest_mass = p_rest;
          for (int64_t j = 0; j < C; ++j)
            if (!kept[j]) p_tilde[j] = p_rest * std::exp(log_q[j] - log_q_rest);
        }
      }
      const acc_t kd = T * T * (kept_kl + rest_kl);
      const acc_t tcp = has_target ? std::exp(true_logit[i] - lse[i]) : acc_t(0);
      acc_t weight = 1;
      if (a.weighting != TopKWeighting::Constant)
        weight = !has_target ? acc_t(0) : (a.weighting == TopKWeighting::InverseTcp ? 1 - tcp : tcp);
      // Reference term: T^2 w KL(softmax(r/T) || q), entries with p = 0 adding 0.
      acc_t ref = 0, ref_mass = 0;
      if (reference) {
        const acc_t lse_r = log_sum_exp_of<acc_t>(C, [&](int64_t j, acc_t& x) {
          x = static_cast<acc_t>(reference[i * C + j]) / T;
          return true;
        });
        acc_t kl = 0;
        for (int64_t j = 0; j < C; ++j) {
          log_r[j] = static_cast<acc_t>(reference[i * C + j]) / T - lse_r;
          const acc_t p = std::exp(log_r[j]);
          if (p != 0) kl += p * (log_r[j] - log_q[j]);
          ref_mass += p;
        }
        ref = T * T * weight * kl;
      }
      const acc_t ce_w = a.ce_weight, kd_w = a.kd_weight, ref_w = a.ref_weight;
      out[0][i] = ce_w * ce + kd_w * kd + ref_w * ref;
      out[1][i] = ce;
      out[2][i] = kd;
      out[3][i] = ref;
      out[4][i] = tcp;
      out[5][i] = weight;
      if (!grad_row) continue;
      const acc_t total_mass = kept_mass + rest_mass;
      for (int64_t j = 0; j < C; ++j) {
        const acc_t q = std::exp(log_q[j]);
        acc_t g = kd_w * T * (q * total_mass - p_tilde[j]);
        if (has_target) g += ce_w * (std::exp(s[j] - lse1) - (j == y ? acc_t(1) : acc_t(0)));
        if (reference) g += ref_w * T * weight * (q * ref_mass - std::exp(log_r[j]));
        grad_row[j] = static_cast<scalar_t>(g);
      }
    }
  });
}

void check_rows(const char* name, const at::Tensor& tensor, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(tensor.sizes() == shape, "smskd_loss_rows_topk: ", name, " must have shape ", shape, ", got ",
                    tensor.sizes());
  TORCH_CHECK(tensor.device().is_cpu(), "smskd_loss_rows_topk: ", name, " must be on the CPU, got ",
              tensor.device());
}

TopKResult smskd_loss_rows_topk_cpu(const at::Tensor& student, const std::optional<at::Tensor>& target,
                                    const at::Tensor& topk_values, const at::Tensor& topk_indices,
                                    const at::Tensor& true_logit, const at::Tensor& log_sum_exp,
                                    const at::Tensor& log_sum_exp_at_temperature,
                                    const std::optional<at::Tensor>& reference, double temperature,
                                    double ce_weight, double kd_weight, double ref_weight,
                                    c10::string_view weighting, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) >= 1,
                    "smskd_loss_rows_topk: student must have shape (N, C) with C >= 1, got ", student.sizes());
  TORCH_CHECK(student.device().is_cpu(), "smskd_loss_rows_topk: student must be on the CPU, got ", student.device());
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()),
                   "smskd_loss_rows_topk: student must be a floating dtype, got ", student.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "smskd_loss_rows_topk: temperature must be a finite number > 0, got ", temperature);
  TopKArgs args;
  args.rows = student.size(0);
  args.classes = student.size(1);
  TORCH_CHECK_VALUE(topk_values.dim() == 2 && topk_values.size(0) == args.rows && topk_values.size(1) >= 1 &&
                        topk_values.size(1) <= args.classes,
                    "smskd_loss_rows_topk: topk_values must have shape (", args.rows, ", k) with 1 <= k <= ",
                    args.classes, ", got ", topk_values.sizes());
  args.k = topk_values.size(1);
  check_rows("topk_values", topk_values, {args.rows, args.k});
  check_rows("topk_indices", topk_indices, {args.rows, args.k});
  check_rows("true_logit", true_logit, {args.rows});
  check_rows("log_sum_exp", log_sum_exp, {args.rows});
  check_rows("log_sum_exp_at_temperature", log_sum_exp_at_temperature, {args.rows});
  TORCH_CHECK_TYPE(at::isIntegralType(topk_indices.scalar_type(), /*includeBool=*/false),
                   "smskd_loss_rows_topk: topk_indices must hold integer class indices, got ",
                   topk_indices.scalar_type());
  if (reference.has_value()) {
    check_rows("reference", *reference, student.sizes());
    TORCH_CHECK_TYPE(reference->scalar_type() == student.scalar_type(), "smskd_loss_rows_topk: reference must "
                     "have the student's dtype ", student.scalar_type(), ", got ", reference->scalar_type());
  }
  const std::string mode(weighting);
  TORCH_CHECK_VALUE(mode == "inverse_tcp" || mode == "tcp" || mode == "constant",
                    "smskd_loss_rows_topk: weighting must be 'inverse_tcp', 'tcp' or 'constant', got '", mode, "'");
  args.weighting = mode == "inverse_tcp" ? TopKWeighting::InverseTcp
                   : mode == "tcp"       ? TopKWeighting::Tcp
                                         : TopKWeighting::Constant;
  args.temperature = temperature;
  args.ce_weight = ce_weight;
  args.kd_weight = kd_weight;
  args.ref_weight = ref_weight;
  args.ignore_index = ignore_index;

  const at::Tensor indices = topk_indices.to(at::kLong).contiguous();
  const int64_t* index_data = indices.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < indices.numel(); ++n)
    TORCH_CHECK_VALUE(index_data[n] >= 0 && index_data[n] < args.classes, "smskd_loss_rows_topk: topk_indices ",
                      "must be in [0, ", args.classes, "), got ", index_data[n]);
  args.indices = index_data;
  at::Tensor target_long;
  if (target.has_value()) {
    check_rows("target", *target, {args.rows});
    TORCH_CHECK_TYPE(at::isIntegralType(target->scalar_type(), /*includeBool=*/false),
                     "smskd_loss_rows_topk: target must hold integer class indices, got ", target->scalar_type());
    target_long = target->to(at::kLong).contiguous();
    const int64_t* y = target_long.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < args.rows; ++i)
      TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < args.classes), "smskd_loss_rows_topk: target[",
                        i, "] = ", y[i], " is not a class index in [0, ", args.classes, ") nor ignore_index = ",
                        ignore_index);
    args.target = y;
  }

  const auto accumulation = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto as_acc = [&](const at::Tensor& t) { return t.to(accumulation).contiguous(); };
  const at::Tensor values = as_acc(topk_values), true_values = as_acc(true_logit), lse = as_acc(log_sum_exp),
                   lse_t = as_acc(log_sum_exp_at_temperature);
  const at::Tensor student_c = student.contiguous();
  const at::Tensor reference_c = reference.has_value() ? reference->contiguous() : at::Tensor();
  std::array<at::Tensor, 6> per_row;
  for (auto& t : per_row) t = at::empty({args.rows}, student.options().dtype(accumulation));
  at::Tensor grad = at::empty({compute_grad ? args.rows : 0, args.classes}, student.options());
  if (args.rows == 0) return {per_row[0], per_row[1], per_row[2], per_row[3], per_row[4], per_row[5], grad};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "smskd_loss_rows_topk", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::array<acc_t*, 6> out;
    for (size_t n = 0; n < out.size(); ++n) out[n] = per_row[n].data_ptr<acc_t>();
    topk_rows_kernel<scalar_t, acc_t>(
        args, student_c.const_data_ptr<scalar_t>(),
        reference.has_value() ? reference_c.const_data_ptr<scalar_t>() : nullptr, values.const_data_ptr<acc_t>(),
        true_values.const_data_ptr<acc_t>(), lse.const_data_ptr<acc_t>(), lse_t.const_data_ptr<acc_t>(), out,
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
  });
  return {per_row[0], per_row[1], per_row[2], per_row[3], per_row[4], per_row[5], grad};
}

}  // namespace
}  // namespace smskd::cpu

TORCH_LIBRARY_IMPL(smskd_fast, CPU, m) { m.impl("smskd_loss_rows_topk", &smskd::cpu::smskd_loss_rows_topk_cpu); }
