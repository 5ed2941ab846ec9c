// Building blocks of the CPU loss kernels, shared by the dense teacher form
// (loss_rows_kernel_impl.h) and the top-k form (loss_rows_topk_kernel_impl.h):
// vector exp and reductions over blocks of kBlock columns, the online softmax
// statistics of a row, and the driver that runs a row kernel over all rows
// (over rows in parallel, or over each row's columns when rows are few).
//
// Compiled once per instruction set like the kernels: the including translation
// unit defines CPU_CAPABILITY first.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "loss_rows_args.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including loss_rows_blocks.h"
#endif

namespace smskd::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Columns per block: the blocks of the three inputs (and the gradient) stay in L1.
constexpr int64_t kBlock = 1024;
// exp((x-m)/T)^k replaces exp(x-m) when T is an integer k up to this bound.
constexpr int kMaxIntegerTemperature = 8;

// k when the temperature is an integer k in [1, kMaxIntegerTemperature], else 0.
inline int integer_power_of(double temperature) {
  const bool small_integer = temperature == std::floor(temperature) && temperature >= 1 &&
                             temperature <= kMaxIntegerTemperature;
  return small_integer ? static_cast<int>(temperature) : 0;
}

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
// cross = sum exp((x - max)/T) * ((x - shift()) - (s - student_shift)) with s the
// student's logits: each logit is taken relative to its own row's shift before the
// two are subtracted, so that the p-weighted difference stays exact where both are
// far out (x - s itself would round to the spacing of x: a teacher logit of 1e4
// cost KD ~1e-3, PyTorch's composition does not lose it). student_shift is the
// student's shift when the sums were last aligned with it (follow).
template <typename acc_t>
struct RunningStats {
  acc_t max = kNegInf<acc_t>;
  acc_t soft = 0, one = 0, cross = 0;
  acc_t student_shift = 0;

  // Includes a block whose maximum is block_max, rescaling the sums so far.
  void raise(acc_t block_max, acc_t inv_temperature) {
    if (std::isnan(block_max)) {
      max = block_max;  // a NaN logit makes the row's loss NaN
      return;
    }
    if (!(block_max > max)) return;
    if (max != kNegInf<acc_t>) rebase(block_max, inv_temperature);
    max = block_max;
  }

  // Re-expresses cross for the student's shift new_student_shift (before the student's
  // logits of the next block are taken relative to it).
  void follow(acc_t new_student_shift) {
    if (soft != 0 && new_student_shift != student_shift) cross += soft * (new_student_shift - student_shift);
    student_shift = new_student_shift;
  }

  // Combines the statistics of another, disjoint, range of the same row's columns (cross of both
  // taken at the same student shift: see merge_at).
  void merge(const RunningStats& other, acc_t inv_temperature) {
    if (std::isnan(other.max)) max = other.max;
    if (std::isnan(max) || other.max == kNegInf<acc_t>) return;  // other's sums are all 0
    if (max == kNegInf<acc_t>) {
      *this = other;
      return;
    }
    // The range holding the maximum keeps its sums as they are (factor 1, as in raise), so that a
    // +inf maximum gives the same statistics split or not, not inf - inf = NaN.
    const acc_t top = max > other.max ? max : other.max;
    RunningStats part = other;
    if (max != top) rebase(top, inv_temperature);
    if (part.max != top) part.rebase(top, inv_temperature);
    soft += part.soft;
    cross += part.cross;
    one += part.one;
    max = top;
  }

  // merge for a companion row (teacher, reference) whose ranges followed different student
  // shifts: both re-expressed first at student_shift, the merged student's own, so that no
  // correction is made and taken back (that cancellation cost the term eps times the shifts' gap).
  void merge_at(const RunningStats& other, acc_t new_student_shift, acc_t inv_temperature) {
    follow(new_student_shift);
    RunningStats aligned = other;
    aligned.follow(new_student_shift);
    merge(aligned, inv_temperature);
  }

  // What exp's argument is shifted by: the maximum, or 0 while every value so
  // far is -inf (their exp is then 0, not NaN).
  acc_t shift() const { return max == kNegInf<acc_t> ? acc_t(0) : max; }

 private:
  // The sums at the larger maximum top instead of max (finite, below top): every
  // term's x - max becomes x - top; a factor 0 (top = +inf) leaves sums of 0.
  void rebase(acc_t top, acc_t inv_temperature) {
    const acc_t drop = max - top;
    const acc_t soft_scale = std::exp(drop * inv_temperature);
    cross = soft_scale == 0 ? acc_t(0) : (cross + soft * drop) * soft_scale;
    soft *= soft_scale;
    one *= std::exp(drop);
  }
};

// KL(softmax(x/T) || softmax(s/T)) from the running statistics of x and s, as
// [sum_c p_c ((x_c - m_x) - (s_c - m_s))] / T + log(soft_s) - log(soft_x) (cross
// taken at s's final shift: its student_shift, or re-expressed here). A row with
// one class (sums exactly 1, cross exactly 0) gives exactly 0, as the CUDA kernel does.
// A NaN logit in either row (its maximum NaN) gives NaN whatever the sums hold.
template <typename acc_t>
inline acc_t softened_kl(const RunningStats<acc_t>& x, const RunningStats<acc_t>& s, acc_t inv_temperature) {
  if (std::isnan(x.max) || std::isnan(s.max)) return std::numeric_limits<acc_t>::quiet_NaN();
  RunningStats<acc_t> aligned = x;
  aligned.follow(s.shift());
  return aligned.cross / aligned.soft * inv_temperature + (std::log(s.soft) - std::log(x.soft));
}

// -log softmax(s)_y = (max - s_y) + log(one) from the student's statistics. A +inf logit makes its term
// of one exp(inf - inf): NaN, or a finite number through exp_u20's clamp (AVX2/AVX512), so that one says
// nothing there; CE is then +inf, or NaN with the +inf at the target, as PyTorch's.
template <typename acc_t>
inline acc_t cross_entropy(const RunningStats<acc_t>& s, acc_t s_y) {
  if (s.max == std::numeric_limits<acc_t>::infinity()) return s.max - s_y;
  return (s.max - s_y) + std::log(s.one);
}

// softmax(t)_y from the teacher's statistics: NaN when a logit is +inf (inf / inf), as PyTorch's, where
// exp_u20's clamp would leave one finite and the probability 0.
template <typename acc_t>
inline acc_t true_class_probability(const RunningStats<acc_t>& t, acc_t t_y) {
  if (t.max == std::numeric_limits<acc_t>::infinity()) return std::numeric_limits<acc_t>::quiet_NaN();
  return std::exp(t_y - t.max) / t.one;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
inline acc_t* per_row_output(const LossRowsArgs& args, int which) {
  return static_cast<acc_t*>(args.per_row[which]);
}

// w_i of the reference term: 1 for constant weighting, else from the row's TCP
// where it is computable (a teacher and a target given), else 0.
template <typename acc_t>
inline acc_t reference_weight(smskd_weighting weighting, bool tcp_known, acc_t tcp) {
  if (weighting == SMSKD_WEIGHT_CONSTANT) return 1;
  if (!tcp_known) return 0;
  return weighting == SMSKD_WEIGHT_INVERSE_TCP ? acc_t(1) - tcp : tcp;
}

// Writes a row's loss (ce_weight ce + kd_weight kd + ref_weight ref) and its terms.
template <typename acc_t>
inline void write_row_outputs(const LossRowsArgs& args, int64_t row, acc_t ce, acc_t kd, acc_t ref, acc_t tcp,
                              acc_t weight) {
  const acc_t loss = static_cast<acc_t>(args.ce_weight) * ce + static_cast<acc_t>(args.kd_weight) * kd +
                     static_cast<acc_t>(args.ref_weight) * ref;
#define SMSKD_OUTPUT_VALUE(name) name,
  const std::array<acc_t, SMSKD_NUM_PER_ROW_OUTPUTS> outputs{SMSKD_PER_ROW_OUTPUTS(SMSKD_OUTPUT_VALUE)};
#undef SMSKD_OUTPUT_VALUE
  for (int k = 0; k < SMSKD_NUM_PER_ROW_OUTPUTS; ++k) per_row_output<acc_t>(args, k)[row] = outputs[k];
}

template <typename scalar_t>
inline scalar_t* grad_row(const LossRowsArgs& args, int64_t row) {
  return static_cast<scalar_t*>(args.grad) + row * args.classes;
}

// An ignored row (target == ignore_index): writes its zeros and returns true.
template <typename scalar_t, typename acc_t>
inline bool write_if_ignored(const LossRowsArgs& args, int64_t row) {
  if (args.target == nullptr || args.target[row] != args.ignore_index) return false;
  for (int k = 0; k < SMSKD_NUM_PER_ROW_OUTPUTS; ++k) per_row_output<acc_t>(args, k)[row] = 0;
  if (args.grad != nullptr) std::memset(grad_row<scalar_t>(args, row), 0, args.classes * sizeof(scalar_t));
  return true;
}

// Whether the gradient pass runs for a finished row: a gradient is wanted and the
// loss is not NaN (a NaN loss gets an all-NaN gradient row here instead).
template <typename scalar_t, typename acc_t>
inline bool wants_grad(const LossRowsArgs& args, int64_t row) {
  if (args.grad == nullptr) return false;
  if (!std::isnan(per_row_output<acc_t>(args, 0)[row])) return true;
  scalar_t* grad = grad_row<scalar_t>(args, row);
  std::fill(grad, grad + args.classes, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
  return false;
}

// Rows per task: enough columns per task that scheduling costs little.
inline int64_t grain_size(int64_t classes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1)); }

// Runs a row kernel over every row of args. The kernel provides the types Scratch
// (per-thread blocks), Stats (a row's statistics over a range of columns, with
// merge) and Coefficients, and
//   bool skip(row)                                   // an ignored row, already written
//   Stats stats_of(row, begin, end, Scratch&)        // pass 1 over columns [begin, end)
//   Coefficients finish_row(row, const Stats&)       // writes the per-row outputs
//   void write_grad(row, begin, end, const Coefficients&, Scratch&)  // pass 2
// with begin a multiple of kBlock. Rows run in parallel; with fewer rows than
// threads, each of several blocks per thread, each row's columns are split into
// one range per thread instead and the partial statistics merged.
template <typename scalar_t, typename acc_t, typename Kernel>
void run_row_kernel(const Kernel& kernel, const LossRowsArgs& args) {
  using Scratch = typename Kernel::Scratch;
  using Stats = typename Kernel::Stats;
  const int64_t threads = at::get_num_threads();
  if (!(threads > 1 && args.rows < threads && args.classes >= 2 * threads * kBlock)) {
    at::parallel_for(0, args.rows, grain_size(args.classes), [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t row = begin; row < end; ++row) {
        if (kernel.skip(row)) continue;
        const auto c = kernel.finish_row(row, kernel.stats_of(row, 0, args.classes, scratch));
        if (wants_grad<scalar_t, acc_t>(args, row)) kernel.write_grad(row, 0, args.classes, c, scratch);
      }
    });
    return;
  }
  const int64_t parts = threads;
  const int64_t part_width = ceil_div(ceil_div(args.classes, kBlock), parts) * kBlock;
  std::vector<Stats> partial(parts);
  for (int64_t row = 0; row < args.rows; ++row) {
    if (kernel.skip(row)) continue;
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      Scratch scratch;
      for (int64_t part = first; part < last; ++part) {
        const int64_t begin = part * part_width;
        partial[part] = kernel.stats_of(row, begin, std::min(args.classes, begin + part_width), scratch);
      }
    });
    Stats stats = partial[0];
    for (int64_t part = 1; part < parts; ++part) stats.merge(partial[part], kernel.inv_temperature());
    const auto c = kernel.finish_row(row, stats);
    if (!wants_grad<scalar_t, acc_t>(args, row)) continue;
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      Scratch scratch;
      for (int64_t part = first; part < last; ++part) {
        const int64_t begin = part * part_width;
        kernel.write_grad(row, begin, std::min(args.classes, begin + part_width), c, scratch);
      }
    });
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace smskd::cpu
