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
// conversion or strided gathering.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "loss_rows_args.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including loss_rows_kernel_impl.h"
#endif

namespace smskd::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Columns per block: the blocks of the three inputs (and the gradient) stay in L1.
constexpr int64_t kBlock = 1024;
// exp((x-m)/T)^k replaces exp(x-m) when T is an integer k up to this bound.
constexpr int kMaxIntegerTemperature = 8;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// exp on a vector: ATen's fast polynomial for float (relative error about 1e-6,
// exactly 0 below log(FLT_MIN), so masked -inf logits give 0); Sleef for double.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// x^k for a small positive integer k.
template <typename acc_t>
inline Vectorized<acc_t> vpow(const Vectorized<acc_t>& x, int k) {
  Vectorized<acc_t> result = x;
  for (int j = 1; j < k; ++j) result = result * x;
  return result;
}

// n >= size(): a full vector; otherwise the first n values, padded with -inf
// (probability 0, so padding adds nothing to any sum).
template <typename acc_t>
inline Vectorized<acc_t> load_padded(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if (n >= Vec::size()) return Vec::loadu(x);
  return Vec::set(Vec(kNegInf<acc_t>), Vec::loadu(x, n), n);
}

// p * v where p > 0, else 0: an entry of probability 0 adds nothing even when
// v is infinite or NaN (a masked -inf logit).
template <typename acc_t>
inline Vectorized<acc_t> weighted(const Vectorized<acc_t>& p, const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0));
  return Vec::blendv(zero, p * v, p != zero);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// Largest value of x[0, n); NaN when any value is NaN.
template <typename acc_t>
inline acc_t block_max(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec m0(kNegInf<acc_t>), m1(kNegInf<acc_t>);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + Vec::size()));
  }
  for (; i < n; i += Vec::size()) m0 = at::vec::maximum(m0, load_padded(x + i, n - i));
  return at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, at::vec::maximum(m0, m1));
}

// Points at values [begin, begin + n) of one row as acc_t: the input itself when
// it is contiguous and of type acc_t, else a copy converted into buffer.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_block(const LogitsView& view, int64_t row, int64_t begin, int64_t n, acc_t* buffer) {
  const scalar_t* x = static_cast<const scalar_t*>(view.data) + row * view.row_stride + begin * view.col_stride;
  const int64_t stride = view.col_stride;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return x;
    for (int64_t i = 0; i < n; ++i) buffer[i] = x[i * stride];
  } else {
    if (stride == 1) {
      using Vec = Vectorized<float>;
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        Vec v;
        at::vec::load_to_float(x + i, v);
        v.store(buffer + i);
      }
      for (; i < n; ++i) buffer[i] = static_cast<float>(x[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i * stride]);
    }
  }
  return buffer;
}

template <typename scalar_t, typename acc_t>
inline acc_t value_at(const LogitsView& view, int64_t row, int64_t col) {
  return static_cast<acc_t>(static_cast<const scalar_t*>(view.data)[row * view.row_stride + col * view.col_stride]);
}

// Online softmax statistics of one input's row, relative to its running maximum:
// soft = sum exp((x - max)/T), one = sum exp(x - max),
// cross = sum exp((x - max)/T) * (x - s) with s the student's logits.
template <typename acc_t>
struct RunningStats {
  acc_t max = kNegInf<acc_t>;
  acc_t soft = 0, one = 0, cross = 0;

  // Includes a block whose maximum is block_max, rescaling the sums so far.
  void raise(acc_t block_max, acc_t inv_temperature) {
    if (std::isnan(block_max)) {
      max = block_max;  // a NaN logit makes the row's loss NaN
      return;
    }
    if (!(block_max > max)) return;
    if (max != kNegInf<acc_t>) {
      const acc_t drop = max - block_max;
      const acc_t soft_scale = std::exp(drop * inv_temperature);
      soft *= soft_scale;
      cross *= soft_scale;
      one *= std::exp(drop);
    }
    max = block_max;
  }

  // Combines the statistics of another, disjoint, range of the same row's columns.
  void merge(const RunningStats& other, acc_t inv_temperature) {
    if (std::isnan(other.max)) max = other.max;
    if (std::isnan(max) || other.max == kNegInf<acc_t>) return;  // other's sums are all 0
    if (max == kNegInf<acc_t>) {
      *this = other;
      return;
    }
    const acc_t top = max > other.max ? max : other.max;
    const acc_t own_soft = std::exp((max - top) * inv_temperature), own_one = std::exp(max - top);
    const acc_t other_soft = std::exp((other.max - top) * inv_temperature), other_one = std::exp(other.max - top);
    soft = soft * own_soft + other.soft * other_soft;
    cross = cross * own_soft + other.cross * other_soft;
    one = one * own_one + other.one * other_one;
    max = top;
  }

  // What exp's argument is shifted by: the maximum, or 0 while every value so
  // far is -inf (their exp is then 0, not NaN).
  acc_t shift() const { return max == kNegInf<acc_t> ? acc_t(0) : max; }
};

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
    const double t = args.temperature;
    integer_power_ = (t == std::floor(t) && t >= 1 && t <= kMaxIntegerTemperature) ? static_cast<int>(t) : 0;
  }

  // Rows [begin, end), each row by this thread alone.
  void run_rows(int64_t begin, int64_t end) const {
    Scratch scratch;
    for (int64_t row = begin; row < end; ++row) {
      if (skip_ignored(row)) continue;
      const int64_t target = target_of(row);
      const Coefficients c = finish_row(row, target, stats_of(row, 0, args_.classes, scratch));
      if (wants_grad(row)) write_grad(row, 0, args_.classes, target, c, scratch);
    }
  }

  // Every row, one after another, with each row's columns split into `parts` ranges
  // that run in parallel (partial statistics merged): for fewer rows than threads.
  void run_rows_split_columns(int64_t parts) const {
    const int64_t part_width = ceil_div(ceil_div(args_.classes, kBlock), parts) * kBlock;
    std::vector<RowStats> partial(parts);
    for (int64_t row = 0; row < args_.rows; ++row) {
      if (skip_ignored(row)) continue;
      at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
        Scratch scratch;
        for (int64_t part = first; part < last; ++part) {
          const int64_t begin = part * part_width;
          partial[part] = stats_of(row, begin, std::min(args_.classes, begin + part_width), scratch);
        }
      });
      RowStats stats = partial[0];
      for (int64_t part = 1; part < parts; ++part) stats.merge(partial[part], inv_temperature_);
      const int64_t target = target_of(row);
      const Coefficients c = finish_row(row, target, stats);
      if (!wants_grad(row)) continue;
      at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
        Scratch scratch;
        for (int64_t part = first; part < last; ++part) {
          const int64_t begin = part * part_width;
          write_grad(row, begin, std::min(args_.classes, begin + part_width), target, c, scratch);
        }
      });
    }
  }

 private:
  // Per-thread blocks for converted or gathered inputs and the staged gradient.
  struct Scratch {
    alignas(64) acc_t student[kBlock];
    alignas(64) acc_t teacher[kBlock];
    alignas(64) acc_t reference[kBlock];
    alignas(64) acc_t grad[kBlock];
  };

  struct RowStats {
    RunningStats<acc_t> student, teacher, reference;

    void merge(const RowStats& other, acc_t inv_temperature) {
      student.merge(other.student, inv_temperature);
      teacher.merge(other.teacher, inv_temperature);
      reference.merge(other.reference, inv_temperature);
    }
  };

  // Everything pass 2 needs: the shifts and normalisers of each softmax and the
  // gradient's coefficient of each (SPEC.md section 2).
  struct Coefficients {
    acc_t s_shift = 0, t_shift = 0, r_shift = 0;
    acc_t inv_s_one = 0, inv_s_soft = 0, inv_t_soft = 0, inv_r_soft = 0;
    acc_t ce = 0;       // ce_weight, on softmax(s) - onehot(y)
    acc_t student = 0;  // T*(kd_weight + ref_weight*w), on softmax(s/T)
    acc_t teacher = 0;  // T*kd_weight, on softmax(t/T)
    acc_t reference = 0;  // T*ref_weight*w, on softmax(r/T)
  };

  struct Blocks {
    const acc_t* student = nullptr;
    const acc_t* teacher = nullptr;
    const acc_t* reference = nullptr;
  };

  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

  acc_t* per_row(int which) const { return static_cast<acc_t*>(args_.per_row[which]); }
  scalar_t* grad_row(int64_t row) const { return static_cast<scalar_t*>(args_.grad) + row * args_.classes; }

  // Writes the zeros of an ignored row (target == ignore_index) and returns true.
  bool skip_ignored(int64_t row) const {
    if constexpr (Has::target) {
      if (args_.target[row] == args_.ignore_index) {
        for (int k = 0; k < 6; ++k) per_row(k)[row] = 0;
        if (args_.grad != nullptr) std::memset(grad_row(row), 0, args_.classes * sizeof(scalar_t));
        return true;
      }
    }
    return false;
  }

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

  // Pass 1 over columns [begin, end) of a row (begin a multiple of kBlock).
  RowStats stats_of(int64_t row, int64_t begin, int64_t end, Scratch& scratch) const {
    RowStats stats;
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t n = std::min(kBlock, end - block);
      accumulate_block(load(row, block, n, scratch), n, stats);
    }
    return stats;
  }

  // Whether pass 2 runs for a finished row: a gradient is wanted and the loss is not
  // NaN (a NaN loss gets an all-NaN gradient row here instead).
  bool wants_grad(int64_t row) const {
    if (args_.grad == nullptr) return false;
    if (!std::isnan(per_row(0)[row])) return true;
    scalar_t* grad = grad_row(row);
    std::fill(grad, grad + args_.classes, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return false;
  }

  // Pass 2 over columns [begin, end) of a row (begin a multiple of kBlock).
  void write_grad(int64_t row, int64_t begin, int64_t end, int64_t target, const Coefficients& c,
                  Scratch& scratch) const {
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t n = std::min(kBlock, end - block);
      write_grad_block(load(row, block, n, scratch), block, n, target, c, grad_row(row), scratch.grad);
    }
  }

  // Pass 1 over one block: raise the running maxima, then add the block's sums.
  void accumulate_block(const Blocks& x, int64_t n, RowStats& stats) const {
    stats.student.raise(block_max(x.student, n), inv_temperature_);
    if constexpr (Has::teacher) stats.teacher.raise(block_max(x.teacher, n), inv_temperature_);
    if constexpr (Has::reference) stats.reference.raise(block_max(x.reference, n), inv_temperature_);

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
        t_cross += weighted(ut, t - s);
        if constexpr (Has::target) t_one += k ? vpow(ut, k) : vexp(dt);
      }
      if constexpr (Has::reference) {
        const Vec r = load_padded(x.reference + i, n - i);
        const Vec ur = vexp((r - r_shift) * inv_t);
        r_soft += ur;
        r_cross += weighted(ur, r - s);
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

  // KL(softmax(x/T) || softmax(s/T)) from the running statistics of x and s.
  acc_t softened_kl(const RunningStats<acc_t>& x, const RunningStats<acc_t>& s) const {
    return x.cross / (temperature_ * x.soft) - (x.max - s.max) * inv_temperature_ + std::log(s.soft) - std::log(x.soft);
  }

  Coefficients finish_row(int64_t row, int64_t target, const RowStats& stats) const {
    const acc_t T = temperature_;
    acc_t ce = 0, kd = 0, ref = 0, tcp = 0;
    if constexpr (Has::target) {
      const acc_t s_y = value_at<scalar_t, acc_t>(args_.student, row, target);
      ce = (stats.student.max - s_y) + std::log(stats.student.one);
    }
    if constexpr (Has::teacher) {
      kd = T * T * softened_kl(stats.teacher, stats.student);
      if constexpr (Has::target) {
        const acc_t t_y = value_at<scalar_t, acc_t>(args_.teacher, row, target);
        tcp = std::exp(t_y - stats.teacher.max) / stats.teacher.one;
      }
    }
    acc_t weight = 0;
    if (args_.weighting == Weighting::Constant) {
      weight = 1;
    } else if (Has::teacher && Has::target) {
      weight = args_.weighting == Weighting::InverseTcp ? acc_t(1) - tcp : tcp;
    }
    if constexpr (Has::reference) ref = T * T * weight * softened_kl(stats.reference, stats.student);

    const acc_t ce_weight = static_cast<acc_t>(args_.ce_weight);
    const acc_t kd_weight = static_cast<acc_t>(args_.kd_weight);
    const acc_t ref_weight = static_cast<acc_t>(args_.ref_weight);
    per_row(0)[row] = ce_weight * ce + kd_weight * kd + ref_weight * ref;
    per_row(1)[row] = ce;
    per_row(2)[row] = kd;
    per_row(3)[row] = ref;
    per_row(4)[row] = tcp;
    per_row(5)[row] = weight;

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
    c.student = c.teacher + c.reference;
    return c;
  }

  // Pass 2 over one block: the gradient of the row's loss with respect to s.
  void write_grad_block(const Blocks& x, int64_t begin, int64_t n, int64_t target, const Coefficients& c,
                        scalar_t* row_grad, acc_t* grad_buffer) const {
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    acc_t* out = direct ? reinterpret_cast<acc_t*>(row_grad + begin) : grad_buffer;
    const Vec inv_t(inv_temperature_);
    const Vec s_shift(c.s_shift), t_shift(c.t_shift), r_shift(c.r_shift);
    const Vec inv_s_one(c.inv_s_one), inv_s_soft(c.inv_s_soft), inv_t_soft(c.inv_t_soft), inv_r_soft(c.inv_r_soft);
    const Vec ce_coef(c.ce), s_coef(c.student), t_coef(c.teacher), r_coef(c.reference);
    const bool with_ce = Has::target && c.ce != 0;
    const int k = integer_power_;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec s = load_padded(x.student + i, n - i);
      const Vec ds = s - s_shift;
      Vec g(acc_t(0));
      Vec us(acc_t(0));  // exp((s - max)/T), unnormalised
      if constexpr (Has::soft_student) {
        us = vexp(ds * inv_t);
        g = s_coef * (us * inv_s_soft);
      }
      if (with_ce) {
        const Vec p = (Has::soft_student && k) ? vpow(us, k) * inv_s_one : vexp(ds) * inv_s_one;
        g = at::vec::fmadd(ce_coef, p, g);
      }
      if constexpr (Has::teacher) {
        const Vec t = load_padded(x.teacher + i, n - i);
        g = g - t_coef * (vexp((t - t_shift) * inv_t) * inv_t_soft);
      }
      if constexpr (Has::reference) {
        const Vec r = load_padded(x.reference + i, n - i);
        g = g - r_coef * (vexp((r - r_shift) * inv_t) * inv_r_soft);
      }
      g.store(out + i, static_cast<int>(std::min<int64_t>(n - i, Vec::size())));
    }
    if (Has::target && target >= begin && target < begin + n) out[target - begin] -= c.ce;
    if constexpr (!direct) at::vec::convert(grad_buffer, row_grad + begin, n);
  }

  const LossRowsArgs& args_;
  const acc_t temperature_;
  const acc_t inv_temperature_;
  int integer_power_ = 0;
};

// Rows per task: enough columns per task that scheduling costs little.
inline int64_t grain_size(int64_t classes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1)); }

template <typename scalar_t, typename Has>
void run_all_rows(const LossRowsArgs& args) {
  const RowKernel<scalar_t, Has> kernel(args);
  const int64_t threads = at::get_num_threads();
  // Fewer rows than threads, each of several blocks per thread: split the columns.
  if (threads > 1 && args.rows < threads && args.classes >= 2 * threads * kBlock) {
    kernel.run_rows_split_columns(threads);
    return;
  }
  at::parallel_for(0, args.rows, grain_size(args.classes),
                   [&](int64_t begin, int64_t end) { kernel.run_rows(begin, end); });
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
