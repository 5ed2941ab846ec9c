// The fused per-row SMSKD loss on the CPU (SPEC.md section 2), written once and
// compiled once per instruction set: each including translation unit defines
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) first, which selects ATen's
// Vectorized implementation and names the namespace of this copy.
//
// Per row, columns are processed in blocks of kBlock:
//   pass 1, per block: the block maxima of s, t, r (one read from memory), then
//           sums of exp((x - max)/T), exp(x - max) and exp((x - max)/T)*(x - s)
//           over the same block while it is in L1 (online softmax: the running
//           sums are rescaled when a block raises a running maximum);
//   pass 2, only when the gradient is wanted: the gradient of the row's loss,
//           written while the row is still in cache.
// No N x C temporary: per thread, four blocks of kBlock values for type
// conversion or strided gathering. The building blocks and the driver over rows
// are in loss_rows_blocks.h, shared with the top-k form.
#pragma once

#include "loss_rows_blocks.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including loss_rows_kernel_impl.h"
#endif

namespace smskd::cpu {
namespace CPU_CAPABILITY {
namespace {

// Which inputs a row has; fixed per call, so each combination is its own loop.
template <bool kTarget, bool kTeacher, bool kReference>
struct Inputs {
  static constexpr bool target = kTarget;
  static constexpr bool teacher = kTeacher;
  static constexpr bool reference = kReference;
  // softmax(s/T) is needed by the KD and reference terms only.
  static constexpr bool soft_student = kTeacher || kReference;
};

template <typename scalar_t, typename Has>
class RowKernel {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;

 public:
  explicit RowKernel(const LossRowsArgs& args)
      : args_(args),
        temperature_(static_cast<acc_t>(args.temperature)),
        inv_temperature_(acc_t(1) / static_cast<acc_t>(args.temperature)) {
  }

  // The interface of the driver run_row_kernel (loss_rows_blocks.h).

  // Per-thread blocks for converted or gathered inputs and the staged gradient.
  struct Scratch {
    alignas(64) acc_t student[kBlock];
    alignas(64) acc_t teacher[kBlock];
    alignas(64) acc_t reference[kBlock];
    alignas(64) acc_t grad[kBlock];
  };

  struct Stats {
    RunningStats<acc_t> student, teacher, reference;

    void merge(const Stats& other, acc_t inv_temperature) {
      student.merge(other.student, inv_temperature);
      teacher.merge_at(other.teacher, student.shift(), inv_temperature);
      reference.merge_at(other.reference, student.shift(), inv_temperature);
    }
  };

  // Everything pass 2 needs: the shifts and normalisers of each softmax and the
  // gradient's coefficient of each difference of softmaxes (SPEC.md section 2).
  struct Coefficients {
    acc_t s_shift = 0, t_shift = 0, r_shift = 0;
    acc_t inv_s_one = 0, inv_s_soft = 0, inv_t_soft = 0, inv_r_soft = 0;
    acc_t ce = 0;         // ce_weight, on softmax(s) - onehot(y)
    acc_t teacher = 0;    // T*kd_weight, on softmax(s/T) - softmax(t/T)
    acc_t reference = 0;  // T*ref_weight*w, on softmax(s/T) - softmax(r/T)
    int64_t target = 0;
  };

  bool skip(int64_t row) const { return write_if_ignored<scalar_t, acc_t>(args_, row); }

  acc_t inv_temperature() const { return inv_temperature_; }

  // Pass 1 over columns [begin, end) of a row (begin a multiple of kBlock).
  Stats stats_of(int64_t row, int64_t begin, int64_t end, Scratch& scratch) const {
    Stats stats;
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t n = std::min(kBlock, end - block);
      accumulate_block(load(row, block, n, scratch), n, stats);
    }
    return stats;
  }

  // Pass 2 over columns [begin, end) of a row (begin a multiple of kBlock).
  void write_grad(int64_t row, int64_t begin, int64_t end, const Coefficients& c, Scratch& scratch) const {
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t n = std::min(kBlock, end - block);
      write_grad_block(load(row, block, n, scratch), block, n, c, grad_row<scalar_t>(args_, row), scratch.grad);
    }
  }

  Coefficients finish_row(int64_t row, const Stats& stats) const {
    const acc_t T = temperature_;
    const int64_t target = target_of(row);
    acc_t ce = 0, kd = 0, ref = 0, tcp = 0;
    if constexpr (Has::target) {
      const acc_t s_y = value_at<scalar_t, acc_t>(args_.student, row, target);
      ce = cross_entropy(stats.student, s_y);
    }
    if constexpr (Has::teacher) {
      kd = T * T * softened_kl(stats.teacher, stats.student, inv_temperature_);
      if constexpr (Has::target) {
        const acc_t t_y = value_at<scalar_t, acc_t>(args_.teacher, row, target);
        tcp = true_class_probability(stats.teacher, t_y);
      }
    }
    const acc_t weight = reference_weight(args_.weighting, Has::teacher && Has::target, tcp);
    if constexpr (Has::reference) ref = T * T * weight * softened_kl(stats.reference, stats.student, inv_temperature_);

    write_row_outputs(args_, row, ce, kd, ref, tcp, weight);

    // The gradient's weights: the loss weights times the op's grad_scale (1 when absent).
    const acc_t grad_scale = static_cast<acc_t>(args_.grad_scale);
    const acc_t ce_weight = static_cast<acc_t>(args_.ce_weight) * grad_scale;
    const acc_t kd_weight = static_cast<acc_t>(args_.kd_weight) * grad_scale;
    const acc_t ref_weight = static_cast<acc_t>(args_.ref_weight) * grad_scale;

    Coefficients c;
    c.s_shift = stats.student.shift();
    c.t_shift = stats.teacher.shift();
    c.r_shift = stats.reference.shift();
    c.inv_s_one = acc_t(1) / stats.student.one;
    c.inv_s_soft = acc_t(1) / stats.student.soft;
    c.inv_t_soft = acc_t(1) / stats.teacher.soft;
    c.inv_r_soft = acc_t(1) / stats.reference.soft;
    c.ce = Has::target ? ce_weight : acc_t(0);
    c.teacher = Has::teacher ? T * kd_weight : acc_t(0);
    c.reference = Has::reference ? T * ref_weight * weight : acc_t(0);
    c.target = target;
    return c;
  }

 private:
  struct Blocks {
    const acc_t* student = nullptr;
    const acc_t* teacher = nullptr;
    const acc_t* reference = nullptr;
  };

  int64_t target_of(int64_t row) const {
    if constexpr (Has::target) return args_.target[row];
    return 0;
  }

  Blocks load(int64_t row, int64_t begin, int64_t n, Scratch& scratch) const {
    Blocks blocks;
    blocks.student = row_block<scalar_t, acc_t>(args_.student, row, begin, n, scratch.student);
    if constexpr (Has::teacher) blocks.teacher = row_block<scalar_t, acc_t>(args_.teacher, row, begin, n, scratch.teacher);
    if constexpr (Has::reference) {
      blocks.reference = row_block<scalar_t, acc_t>(args_.reference, row, begin, n, scratch.reference);
    }
    return blocks;
  }

  // Pass 1 over one block: raise the running maxima, then add the block's sums. Inlined
  // into the sweep by force: a call per block kept the statistics in memory and cost the
  // forward 5-10% (GCC 12 stopped inlining it once the sums followed the student's shift).
  C10_ALWAYS_INLINE void accumulate_block(const Blocks& x, int64_t n, Stats& stats) const {
    stats.student.raise(block_max(x.student, n), inv_temperature_);
    if constexpr (Has::teacher) stats.teacher.raise(block_max(x.teacher, n), inv_temperature_);
    if constexpr (Has::reference) stats.reference.raise(block_max(x.reference, n), inv_temperature_);
    stats.teacher.follow(stats.student.shift());
    stats.reference.follow(stats.student.shift());

    const Vec inv_t(inv_temperature_);
    const Vec s_shift(stats.student.shift()), t_shift(stats.teacher.shift()), r_shift(stats.reference.shift());
    const Vec zero(acc_t(0));
    Vec s_soft = zero, s_one = zero, t_soft = zero, t_one = zero, t_cross = zero, r_soft = zero, r_cross = zero;
    const int k = integer_power_;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec s = load_padded(x.student + i, n - i);
      const Vec ds = s - s_shift;
      Vec us = zero;  // exp((s - max)/T)
      if constexpr (Has::soft_student) {
        us = vexp(ds * inv_t);
        s_soft += us;
      }
      if constexpr (Has::target) s_one += (Has::soft_student && k) ? vpow(us, k) : vexp(ds);
      if constexpr (Has::teacher) {
        const Vec t = load_padded(x.teacher + i, n - i);
        const Vec dt = t - t_shift;
        const Vec ut = vexp(dt * inv_t);
        t_soft += ut;
        t_cross += weighted(ut, dt - ds);
        if constexpr (Has::target) t_one += k ? vpow(ut, k) : vexp(dt);
      }
      if constexpr (Has::reference) {
        const Vec r = load_padded(x.reference + i, n - i);
        const Vec dr = r - r_shift;
        const Vec ur = vexp(dr * inv_t);
        r_soft += ur;
        r_cross += weighted(ur, dr - ds);
      }
    }
    stats.student.soft += hsum(s_soft);
    stats.student.one += hsum(s_one);
    stats.teacher.soft += hsum(t_soft);
    stats.teacher.one += hsum(t_one);
    stats.teacher.cross += hsum(t_cross);
    stats.reference.soft += hsum(r_soft);
    stats.reference.cross += hsum(r_cross);
  }

  // Pass 2 over one block: the gradient of the row's loss with respect to s, each
  // term a coefficient times a difference of probabilities (softmax(s/T) - softmax(t/T),
  // not T*(kd_weight + ref_weight*w) softmax(s/T) - ...): equal probabilities, as
  // with one class, then give exactly 0.
  void write_grad_block(const Blocks& x, int64_t begin, int64_t n, const Coefficients& c,
                        scalar_t* row_grad, acc_t* grad_buffer) const {
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    acc_t* out = direct ? reinterpret_cast<acc_t*>(row_grad + begin) : grad_buffer;
    const Vec inv_t(inv_temperature_);
    const Vec s_shift(c.s_shift), t_shift(c.t_shift), r_shift(c.r_shift);
    const Vec inv_s_one(c.inv_s_one), inv_s_soft(c.inv_s_soft), inv_t_soft(c.inv_t_soft), inv_r_soft(c.inv_r_soft);
    const Vec ce_coef(c.ce), t_coef(c.teacher), r_coef(c.reference);
    const bool with_ce = Has::target && c.ce != 0;
    const int k = integer_power_;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec s = load_padded(x.student + i, n - i);
      const Vec ds = s - s_shift;
      Vec g(acc_t(0));
      Vec us(acc_t(0));  // exp((s - max)/T), unnormalised
      Vec q(acc_t(0));   // softmax(s/T)
      if constexpr (Has::soft_student) {
        us = vexp(ds * inv_t);
        q = us * inv_s_soft;
      }
      if constexpr (Has::teacher) {
        const Vec t = load_padded(x.teacher + i, n - i);
        g = t_coef * (q - vexp((t - t_shift) * inv_t) * inv_t_soft);
      }
      if constexpr (Has::reference) {
        const Vec r = load_padded(x.reference + i, n - i);
        const Vec difference = q - vexp((r - r_shift) * inv_t) * inv_r_soft;
        g = Has::teacher ? at::vec::fmadd(r_coef, difference, g) : r_coef * difference;
      }
      if (with_ce) {
        const Vec p = (Has::soft_student && k) ? vpow(us, k) * inv_s_one : vexp(ds) * inv_s_one;
        g = at::vec::fmadd(ce_coef, p, g);
      }
      g.store(out + i, static_cast<int>(std::min<int64_t>(n - i, Vec::size())));
    }
    if (Has::target && c.target >= begin && c.target < begin + n) out[c.target - begin] -= c.ce;
    if constexpr (!direct) at::vec::convert(grad_buffer, row_grad + begin, n);
  }

  const LossRowsArgs& args_;
  const acc_t temperature_;
  const acc_t inv_temperature_;
  const int integer_power_ = integer_power_of(args_.temperature);
};

template <typename scalar_t, typename Has>
void run_all_rows(const LossRowsArgs& args) {
  run_row_kernel<scalar_t, acc_type<scalar_t>>(RowKernel<scalar_t, Has>(args), args);
}

template <typename scalar_t>
void run_typed(const LossRowsArgs& args) {
  const bool target = args.target != nullptr;
  const bool teacher = args.teacher.data != nullptr;
  const bool reference = args.reference.data != nullptr;
  const int combination = (target ? 4 : 0) | (teacher ? 2 : 0) | (reference ? 1 : 0);
  switch (combination) {
    case 0: return run_all_rows<scalar_t, Inputs<false, false, false>>(args);
    case 1: return run_all_rows<scalar_t, Inputs<false, false, true>>(args);
    case 2: return run_all_rows<scalar_t, Inputs<false, true, false>>(args);
    case 3: return run_all_rows<scalar_t, Inputs<false, true, true>>(args);
    case 4: return run_all_rows<scalar_t, Inputs<true, false, false>>(args);
    case 5: return run_all_rows<scalar_t, Inputs<true, false, true>>(args);
    case 6: return run_all_rows<scalar_t, Inputs<true, true, false>>(args);
    default: return run_all_rows<scalar_t, Inputs<true, true, true>>(args);
  }
}

}  // namespace

void loss_rows_kernel(const LossRowsArgs& args) {
  switch (args.kind) {
    case ScalarKind::Float64: return run_typed<double>(args);
    case ScalarKind::Float32: return run_typed<float>(args);
    case ScalarKind::BFloat16: return run_typed<c10::BFloat16>(args);
    case ScalarKind::Float16: return run_typed<c10::Half>(args);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace smskd::cpu
