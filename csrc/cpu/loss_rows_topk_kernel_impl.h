// The fused per-row loss with the teacher in the top-k form of a logit cache
// (smskd_fast/backends/topk.py), compiled once per instruction set like the dense kernel
// (loss_rows_kernel_impl.h), whose building blocks and row driver it uses.
//
// Per row, with u_j = exp((s_j - m)/T) and the kept classes sorted by index:
//   pass 1, per block of columns: the online statistics of the student
//           (sum u, and sum exp(s - m) for CE), of the student over the classes
//           not kept (R = sum of u over the rest, masked, so exact: no 1 - sum
//           cancellation) and of the reference;
//   then the kept classes' p_c = exp(v_c/T - lse_T) and log q_c from a gather of
//           s_c, giving KD = T^2 [sum_kept p_c log(p_c/q_c) + p_rest log(p_rest/q_rest)]
//           with q_rest = R / sum u. R shares the row's maximum m, so a rest lying
//           far below m (a confident student at a low temperature) loses precision,
//           then underflows (R = 0 from ~87 T: KD = inf, a NaN gradient); a row with
//           R < kExactRestBelow finds the rest's own maximum and sums it again there
//           (scalar sweeps, rare; nothing per element for the other rows);
//   pass 2, when the gradient is wanted: dKD/ds_j = T (q_j M - p~_j) with M the
//           teacher's total mass and p~_j = p_rest u_j / R on the rest, i.e. u_j
//           times one coefficient on every column not kept (vectorised, with the
//           dense CE and reference terms; u_j at the rest's maximum in a row that
//           took the rare sweep, the coefficients scaled to match), then each kept class rewritten from
//           differences of probabilities, T (q_c M - p_c) + ... (scalar, k per row):
//           equal probabilities, as with one class, then give exactly 0.
// Per thread: blocks of kBlock values for converted or strided inputs, the staged
// gradient and the kept mask of the current block.
#pragma once

#include "loss_rows_blocks.h"

namespace smskd::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t, bool kTarget, bool kReference>
class TopKRowKernel {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;

 public:
  TopKRowKernel(const LossRowsArgs& args, const TopKTeacherView& teacher)
      : args_(args),
        teacher_(teacher),
        temperature_(static_cast<acc_t>(args.temperature)),
        inv_temperature_(acc_t(1) / static_cast<acc_t>(args.temperature)) {}

  // The interface of the driver run_row_kernel (loss_rows_blocks.h).

  struct Scratch {
    alignas(64) acc_t student[kBlock];
    alignas(64) acc_t reference[kBlock];
    alignas(64) acc_t grad[kBlock];
    alignas(64) acc_t kept[kBlock] = {};  // 1 at the current block's kept classes, else 0
  };

  struct Stats {
    RunningStats<acc_t> student;  // every class
    RunningStats<acc_t> rest;     // the classes not kept; its maximum is the student's
    RunningStats<acc_t> reference;

    void merge(const Stats& other, acc_t inv_temperature) {
      student.merge(other.student, inv_temperature);
      rest.merge(other.rest, inv_temperature);
      reference.merge_at(other.reference, student.shift(), inv_temperature);
    }
  };

  // A rest summing to less than this at the row's maximum is summed again at its own (the GPU kernels' threshold,
  // where a flush to zero of terms below 2^-126 would change R by less than 2^-38 of itself).
  static constexpr double kExactRestBelow = 0x1p-64;

  struct Coefficients {
    acc_t s_shift = 0, r_shift = 0, inv_s_one = 0, inv_s_soft = 0, inv_r_soft = 0;
    acc_t u_shift = 0;    // pass 2's u_j = exp((s_j - u_shift)/T): s_shift, or the rest's maximum after the rare sweep
    acc_t ce_scale = 0;   // on pass 2's exp(s_j - u_shift): exp(u_shift - s_shift) / sum exp(s - s_shift)
    acc_t ce = 0;         // ce_weight, on softmax(s) - onehot(y)
    acc_t mass = 0;       // M, the teacher's total mass: kept mass + p_rest
    acc_t rest = 0;       // on u_j of a class not kept: (T kd_weight M + T ref_weight w) / sum u - T kd_weight p_rest / R
                          // (the first part times exp((u_shift - s_shift)/T), R summed at u_shift)
    acc_t teacher = 0;    // T kd_weight, on q_c M - p_c of a kept class
    acc_t reference = 0;  // T ref_weight w, on softmax(s/T) - softmax(r/T)
    int64_t target = 0;
  };

  bool skip(int64_t row) const { return write_if_ignored<scalar_t, acc_t>(args_, row); }

  acc_t inv_temperature() const { return inv_temperature_; }

  Stats stats_of(int64_t row, int64_t begin, int64_t end, Scratch& scratch) const {
    Stats stats;
    for_each_block(row, begin, end, scratch, [&](const Blocks& x, int64_t, int64_t n, const int64_t*, const int64_t*) {
      accumulate_block(x, n, scratch.kept, stats);
    });
    return stats;
  }

  Coefficients finish_row(int64_t row, const Stats& stats) const {
    const acc_t T = temperature_;
    const int64_t target = kTarget ? args_.target[row] : 0;
    const acc_t log_soft = std::log(stats.student.soft);
    acc_t ce = 0, tcp = 0;
    if constexpr (kTarget) {
      ce = cross_entropy(stats.student, value_at<scalar_t, acc_t>(args_.student, row, target));
      tcp = std::exp(teacher_value(teacher_.true_logit, row) - teacher_value(teacher_.log_sum_exp, row));
    }
    // The kept classes: exact p_c, log q_c from the gathered student logits.
    const TeacherRow kept = teacher_row(row);
    acc_t kept_kl = 0, kept_mass = 0, top_log_p = kNegInf<acc_t>;
    for (int64_t c = 0; c < teacher_.k; ++c) {
      const acc_t log_p = kept.log_p(c);
      top_log_p = std::max(top_log_p, log_p);
      const acc_t p = std::exp(log_p);
      if (p != 0) {  // p = 0 (a -inf logit) adds nothing; NaN propagates, as in topk.py
        const acc_t log_q = (value_at<scalar_t, acc_t>(args_.student, row, kept.index[c]) - stats.student.shift()) *
                                inv_temperature_ - log_soft;
        kept_kl += p * (log_p - log_q);
        kept_mass += p;
      }
    }
    // The rest's mass p_rest = 1 - sum p_c, as -expm1(log sum p_c), and its share of the KL.
    acc_t p_rest = 0, rest_kl = 0;
    if (teacher_.k < args_.classes && top_log_p != kNegInf<acc_t>) {
      acc_t scaled = 0;
      for (int64_t c = 0; c < teacher_.k; ++c) scaled += std::exp(kept.log_p(c) - top_log_p);
      p_rest = std::max(-std::expm1(top_log_p + std::log(scaled)), acc_t(0));
    } else if (teacher_.k < args_.classes) {
      p_rest = 1;  // no kept class has any mass
    }
    // R at the row's maximum, or, for a rest far below it, at the rest's own (the rare sweeps; a rest of
    // -inf logits keeps R = 0).
    acc_t rest_shift = stats.student.shift(), rest_sum = stats.rest.soft;
    if (p_rest > 0 && rest_sum < acc_t(kExactRestBelow)) {
      const acc_t rest_max = rest_max_of(row);
      if (rest_max != kNegInf<acc_t>) {
        rest_shift = rest_max;
        rest_sum = rest_sum_at(row, rest_shift);
      }
    }
    const acc_t log_q_rest = (rest_shift - stats.student.shift()) * inv_temperature_ + std::log(rest_sum) - log_soft;
    if (p_rest > 0) rest_kl = p_rest * (std::log(p_rest) - log_q_rest);
    const acc_t kd = T * T * (kept_kl + rest_kl);

    const acc_t weight = reference_weight(args_.weighting, kTarget, tcp);
    acc_t ref = 0;
    if constexpr (kReference) ref = T * T * weight * softened_kl(stats.reference, stats.student, inv_temperature_);

    write_row_outputs(args_, row, ce, kd, ref, tcp, weight);

    // The gradient's weights: the loss weights times the op's grad_scale (1 when absent).
    const acc_t grad_scale = static_cast<acc_t>(args_.grad_scale);
    const acc_t ce_weight = static_cast<acc_t>(args_.ce_weight) * grad_scale;
    const acc_t kd_weight = static_cast<acc_t>(args_.kd_weight) * grad_scale;
    const acc_t ref_weight = static_cast<acc_t>(args_.ref_weight) * grad_scale;

    Coefficients c;
    c.s_shift = stats.student.shift();
    c.r_shift = stats.reference.shift();
    c.inv_s_one = acc_t(1) / stats.student.one;
    c.inv_s_soft = acc_t(1) / stats.student.soft;
    c.inv_r_soft = acc_t(1) / stats.reference.soft;
    c.ce = kTarget ? ce_weight : acc_t(0);
    c.teacher = T * kd_weight;
    c.reference = kReference ? T * ref_weight * weight : acc_t(0);
    c.mass = kept_mass + p_rest;
    c.u_shift = rest_shift;
    const acc_t u_drop = rest_shift - c.s_shift;  // 0 but after the rare sweep
    c.ce_scale = std::exp(u_drop) * c.inv_s_one;
    const acc_t on_any = (c.teacher * c.mass + c.reference) / stats.student.soft * std::exp(u_drop * inv_temperature_);
    c.rest = p_rest > 0 ? on_any - c.teacher * p_rest / rest_sum : on_any;
    c.target = target;
    return c;
  }

  void write_grad(int64_t row, int64_t begin, int64_t end, const Coefficients& c, Scratch& scratch) const {
    const TeacherRow kept = teacher_row(row);
    scalar_t* row_grad = grad_row<scalar_t>(args_, row);
    for_each_block(row, begin, end, scratch,
                   [&](const Blocks& x, int64_t block, int64_t n, const int64_t* first, const int64_t* last) {
                     write_grad_block(x, block, n, first - kept.index, last - kept.index, kept, c, row_grad,
                                      scratch);
                   });
  }

 private:
  struct Blocks {
    const acc_t* student = nullptr;
    const acc_t* reference = nullptr;
  };

  // One row of the teacher: kept classes sorted by index, with their logits.
  struct TeacherRow {
    const int64_t* index;
    const acc_t* value;
    acc_t lse_t, temperature;
    // v_c/T as the log-sum-exp lse_t was formed from (topk.py divides by T), so that
    // a row whose one kept class is all of its mass has log p = 0, p = 1 exactly.
    acc_t log_p(int64_t c) const { return value[c] / temperature - lse_t; }
  };

  // Calls visit(s_j) for each class j of a row that is not kept, in order (scalar: the rare sweeps).
  template <typename Visit>
  void for_each_rest_logit(int64_t row, Visit visit) const {
    const int64_t* kept = teacher_.sorted_indices + row * teacher_.k;
    const int64_t* const kept_end = kept + teacher_.k;
    for (int64_t j = 0; j < args_.classes; ++j) {
      if (kept != kept_end && *kept == j) {
        ++kept;
        continue;
      }
      visit(value_at<scalar_t, acc_t>(args_.student, row, j));
    }
  }

  // The largest logit not kept (-inf when there is none; a NaN among them is kept).
  acc_t rest_max_of(int64_t row) const {
    acc_t top = kNegInf<acc_t>;
    for_each_rest_logit(row, [&](acc_t s) { top = std::isnan(s) || s > top ? s : top; });
    return top;
  }

  // R = sum over the classes not kept of exp((s_j - shift)/T).
  acc_t rest_sum_at(int64_t row, acc_t shift) const {
    acc_t sum = 0;
    for_each_rest_logit(row, [&](acc_t s) { sum += std::exp((s - shift) * inv_temperature_); });
    return sum;
  }

  acc_t teacher_value(const void* values, int64_t row) const { return static_cast<const acc_t*>(values)[row]; }

  TeacherRow teacher_row(int64_t row) const {
    return {teacher_.sorted_indices + row * teacher_.k, static_cast<const acc_t*>(teacher_.sorted_values) + row * teacher_.k,
            teacher_value(teacher_.log_sum_exp_at_temperature, row), temperature_};
  }

  // Calls visit(blocks, block, n, first, last) for each block of columns [begin, end)
  // of a row, [first, last) being the kept classes in the block, whose entries of
  // scratch.kept are 1 during the call (and 0 again after it).
  template <typename Visit>
  void for_each_block(int64_t row, int64_t begin, int64_t end, Scratch& scratch, Visit visit) const {
    const int64_t* index = teacher_.sorted_indices + row * teacher_.k;
    const int64_t* const index_end = index + teacher_.k;
    index = std::lower_bound(index, index_end, begin);
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t n = std::min(kBlock, end - block);
      const int64_t* last = index;
      for (; last != index_end && *last < block + n; ++last) scratch.kept[*last - block] = 1;
      Blocks x;
      x.student = row_block<scalar_t, acc_t>(args_.student, row, block, n, scratch.student);
      if constexpr (kReference) x.reference = row_block<scalar_t, acc_t>(args_.reference, row, block, n, scratch.reference);
      visit(x, block, n, index, last);
      for (const int64_t* kept = index; kept != last; ++kept) scratch.kept[*kept - block] = 0;
      index = last;
    }
  }

  // Pass 1 over one block: raise the running maxima, then add the block's sums.
  void accumulate_block(const Blocks& x, int64_t n, const acc_t* kept, Stats& stats) const {
    const acc_t s_max = block_max(x.student, n);
    stats.student.raise(s_max, inv_temperature_);
    stats.rest.raise(s_max, inv_temperature_);
    if constexpr (kReference) stats.reference.raise(block_max(x.reference, n), inv_temperature_);
    stats.reference.follow(stats.student.shift());

    const Vec inv_t(inv_temperature_), zero(acc_t(0));
    const Vec s_shift(stats.student.shift()), r_shift(stats.reference.shift());
    Vec s_soft = zero, s_one = zero, rest = zero, r_soft = zero, r_cross = zero;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec s = load_padded(x.student + i, n - i);
      const Vec ds = s - s_shift;
      const Vec us = vexp(ds * inv_t);
      s_soft += us;
      rest += Vec::blendv(us, zero, Vec::loadu(kept + i) != zero);
      if constexpr (kTarget) s_one += integer_power_ ? vpow(us, integer_power_) : vexp(ds);
      if constexpr (kReference) {
        const Vec r = load_padded(x.reference + i, n - i);
        const Vec dr = r - r_shift;
        const Vec ur = vexp(dr * inv_t);
        r_soft += ur;
        r_cross += weighted(ur, dr - ds);
      }
    }
    stats.student.soft += hsum(s_soft);
    stats.student.one += hsum(s_one);
    stats.rest.soft += hsum(rest);
    stats.reference.soft += hsum(r_soft);
    stats.reference.cross += hsum(r_cross);
  }

  // Pass 2 over one block; kept classes [first, last) of the row lie in it. Every
  // column as if not kept first, then the kept ones rewritten.
  void write_grad_block(const Blocks& x, int64_t begin, int64_t n, int64_t first, int64_t last,
                        const TeacherRow& kept, const Coefficients& c, scalar_t* row_grad, Scratch& scratch) const {
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    acc_t* out = direct ? reinterpret_cast<acc_t*>(row_grad + begin) : scratch.grad;
    const Vec inv_t(inv_temperature_);
    const Vec u_shift(c.u_shift), r_shift(c.r_shift), ce_scale(c.ce_scale), inv_r_soft(c.inv_r_soft);
    const Vec ce_coef(c.ce), rest_coef(c.rest), r_coef(c.reference);
    const bool with_ce = kTarget && c.ce != 0;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec s = load_padded(x.student + i, n - i);
      const Vec ds = s - u_shift;
      const Vec us = vexp(ds * inv_t);
      Vec g = us * rest_coef;
      if (with_ce) {
        const Vec p = integer_power_ ? vpow(us, integer_power_) * ce_scale : vexp(ds) * ce_scale;
        g = at::vec::fmadd(ce_coef, p, g);
      }
      if constexpr (kReference) {
        const Vec r = load_padded(x.reference + i, n - i);
        g = g - r_coef * (vexp((r - r_shift) * inv_t) * inv_r_soft);
      }
      g.store(out + i, static_cast<int>(std::min<int64_t>(n - i, Vec::size())));
    }
    if (kTarget && c.target >= begin && c.target < begin + n) out[c.target - begin] -= c.ce;
    for (int64_t k = first; k < last; ++k) {
      const int64_t j = kept.index[k] - begin;
      out[j] = kept_grad(x, j, std::exp(kept.log_p(k)), kTarget && kept.index[k] == c.target, c);
    }
    if constexpr (!direct) at::vec::convert(scratch.grad, row_grad + begin, n);
  }

  // The gradient at column j of a block, a kept class of probability p:
  // T kd_weight (q_j M - p) + ce_weight (softmax(s)_j - [j = y]) + T ref_weight w (q_j - softmax(r/T)_j).
  acc_t kept_grad(const Blocks& x, int64_t j, acc_t p, bool is_target, const Coefficients& c) const {
    const acc_t ds = x.student[j] - c.s_shift;
    const acc_t q = std::exp(ds * inv_temperature_) * c.inv_s_soft;
    acc_t g = c.teacher * (q * c.mass - p);
    if (kTarget && c.ce != 0) g += c.ce * (std::exp(ds) * c.inv_s_one - (is_target ? acc_t(1) : acc_t(0)));
    if constexpr (kReference) {
      g += c.reference * (q - std::exp((x.reference[j] - c.r_shift) * inv_temperature_) * c.inv_r_soft);
    }
    return g;
  }

  const LossRowsArgs& args_;
  const TopKTeacherView& teacher_;
  const acc_t temperature_;
  const acc_t inv_temperature_;
  const int integer_power_ = integer_power_of(args_.temperature);
};

template <typename scalar_t, bool kTarget, bool kReference>
void run_topk_rows(const LossRowsArgs& args, const TopKTeacherView& teacher) {
  run_row_kernel<scalar_t, acc_type<scalar_t>>(TopKRowKernel<scalar_t, kTarget, kReference>(args, teacher), args);
}

template <typename scalar_t>
void run_topk_typed(const LossRowsArgs& args, const TopKTeacherView& teacher) {
  const bool target = args.target != nullptr, reference = args.reference.data != nullptr;
  if (target && reference) return run_topk_rows<scalar_t, true, true>(args, teacher);
  if (target) return run_topk_rows<scalar_t, true, false>(args, teacher);
  if (reference) return run_topk_rows<scalar_t, false, true>(args, teacher);
  return run_topk_rows<scalar_t, false, false>(args, teacher);
}

}  // namespace

void loss_rows_topk_kernel(const LossRowsArgs& args, const TopKTeacherView& teacher) {
  switch (args.kind) {
    case ScalarKind::Float64: return run_topk_typed<double>(args, teacher);
    case ScalarKind::Float32: return run_topk_typed<float>(args, teacher);
    case ScalarKind::BFloat16: return run_topk_typed<c10::BFloat16>(args, teacher);
    case ScalarKind::Float16: return run_topk_typed<c10::Half>(args, teacher);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace smskd::cpu
