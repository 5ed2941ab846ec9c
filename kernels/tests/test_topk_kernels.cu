// Standalone test of the top-k teacher form's row kernel (no PyTorch).
//
//   test_topk_kernels           GPU: smskd_loss_rows_topk_launch, every layout, against the float64 oracle
//   test_topk_kernels --quick   a smaller grid, for compute-sanitizer
//   test_topk_kernels --host    the same grid through the CPU emulation of the kernel (no GPU needed)
//   test_topk_kernels --bench   bf16 forward+gradient time and bandwidth, beside the dense kernel
//
// The oracle (topk_oracle.h) is plain float64 loops. Each case lays rows out with
// a padding (odd ones misalign the packs) and checks that the gradient's padding
// is never written. Exit status: 0 passed, 1 failed, 77 no GPU (GPU modes).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "smskd_kernels.h"
#include "topk_emulation.h"
#include "topk_oracle.h"
#include "per_row_outputs.h"
#include "cuda_test_support.h"

namespace {

using namespace smskd::oracle;
using smskd::test::DeviceBuffer;

constexpr unsigned char kUnwritten = 0xff;
int failures = 0;

struct Case {
  smskd_dtype dtype;
  int64_t rows, cols, k;
  bool target, reference;
  smskd_weighting weighting;
  int64_t pad;  // elements before row 0 and after each row: stride = cols + pad
  int threads;  // threads per row; 0: the launcher's choice (GPU only)
  std::optional<float> grad_scale;  // the gradient's factor; none: NULL
};

// Inputs as the kernel reads them, and as the oracle sees them (decoded doubles).
struct Inputs {
  int64_t stride, span;
  std::vector<unsigned char> s_raw, r_raw;
  std::vector<std::vector<double>> s, r;
  std::vector<int64_t> target;
  std::vector<TopKRow> teacher;
  std::vector<float> values, true_logit, lse, lse_t;
  std::vector<int64_t> indices;
  std::vector<uint32_t> mask;
  int64_t mask_words;
};

Inputs make_inputs(const Case& k, float temperature, std::mt19937& rng) {
  Inputs in;
  const size_t elem = bytes_of(k.dtype);
  in.stride = k.cols + k.pad;
  in.span = k.pad + k.rows * in.stride;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  auto logits = [&](std::vector<unsigned char>& raw, std::vector<std::vector<double>>& rows) {
    raw.assign(in.span * elem, 0);
    rows.assign(k.rows, std::vector<double>(k.cols));
    for (int64_t i = 0; i < k.rows; ++i)
      for (int64_t c = 0; c < k.cols; ++c) {
        unsigned char* at = raw.data() + (k.pad + i * in.stride + c) * elem;
        encode(k.dtype, normal(rng), at);
        rows[i][c] = decode(k.dtype, at);
      }
  };
  logits(in.s_raw, in.s);
  if (k.reference) logits(in.r_raw, in.r);
  std::uniform_int_distribution<int64_t> cls(0, k.cols - 1);
  in.mask_words = (k.cols + 31) / 32;
  in.mask.assign(k.rows * in.mask_words, 0u);
  for (int64_t i = 0; i < k.rows; ++i) {
    const int64_t y = (k.target && i % 4 == 1) ? -100 : cls(rng);  // every fourth row ignored
    in.target.push_back(y);
    std::vector<double> t(k.cols);
    for (double& v : t) v = normal(rng);
    std::vector<int64_t> order(k.cols);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k.k, order.end(),
                      [&](int64_t a, int64_t b) { return t[a] > t[b]; });
    std::vector<double> scaled(k.cols);
    for (int64_t c = 0; c < k.cols; ++c) scaled[c] = t[c] / temperature;
    TopKRow row;
    row.true_logit = static_cast<float>(t[y < 0 ? 0 : y]);
    row.lse = static_cast<float>(log_sum_exp(t));
    row.lse_t = static_cast<float>(log_sum_exp(scaled));
    for (int64_t c = 0; c < k.k; ++c) {
      const int64_t j = order[c];
      row.indices.push_back(j);
      row.values.push_back(static_cast<float>(t[j]));
      in.values.push_back(static_cast<float>(t[j]));
      in.indices.push_back(j);
      in.mask[i * in.mask_words + j / 32] |= 1u << (j % 32);
    }
    in.true_logit.push_back(static_cast<float>(row.true_logit));
    in.lse.push_back(static_cast<float>(row.lse));
    in.lse_t.push_back(static_cast<float>(row.lse_t));
    in.teacher.push_back(row);
  }
  return in;
}

smskd_loss_rows_topk_args base_args(const Case& k, const Inputs& in) {
  smskd_loss_rows_topk_args a{};
  a.rows = k.rows, a.cols = k.cols, a.k = k.k, a.dtype = k.dtype;
  a.student_stride = a.reference_stride = a.grad_stride = in.stride;
  a.target_stride = 1, a.kept_mask_stride = in.mask_words;
  a.temperature = 2.5f, a.ce_weight = 0.7f, a.kd_weight = 1.3f, a.ref_weight = 0.9f;
  a.weighting = k.weighting, a.ignore_index = -100, a.threads_per_row = k.threads;
  return a;
}

// Compares the outputs (6 x rows floats) and the gradient (span elements) with the oracle.
void compare(const Case& k, const Inputs& in, const smskd_loss_rows_topk_args& a, const std::vector<float>& out,
             const std::vector<unsigned char>& grad, const char* mode) {
  const size_t elem = bytes_of(k.dtype);
  smskd_loss_rows_args dense{};
  dense.temperature = a.temperature, dense.ce_weight = a.ce_weight, dense.kd_weight = a.kd_weight;
  dense.ref_weight = a.ref_weight, dense.weighting = a.weighting, dense.ignore_index = a.ignore_index;
  const double T2 = double(a.temperature) * a.temperature;
  const double atol = 2e-5 * (1.0 + T2) * std::log(double(k.cols) + 2.0);
  const double scale = k.grad_scale.value_or(1.0f);  // the gradient is scale times the oracle's, the outputs are not
  int bad = 0;
  for (int64_t i = 0; i < k.rows; ++i) {
    const RowWant w = topk_oracle(in.s[i], k.reference ? &in.r[i] : nullptr, in.target[i], k.target, in.teacher[i],
                                  dense);
    const auto want = per_row_values(w);
    for (int f = 0; f < kPerRowOutputs; ++f) {
      const double got = out[f * k.rows + i];
      if (!close(got, want[f], atol, 1e-4) && bad++ < 6)
        std::printf("  row %lld output %d: got %.8g want %.8g\n", (long long)i, f, got, want[f]);
    }
    for (int64_t c = 0; c < k.cols; ++c) {
      const double g = decode(k.dtype, grad.data() + (k.pad + i * in.stride + c) * elem);
      if (!close(g, scale * w.grad[c], 2e-6 * (1.0 + T2) * std::fabs(scale), storage_eps(k.dtype)) && bad++ < 6)
        std::printf("  row %lld grad[%lld]: got %.8g want %.8g\n", (long long)i, (long long)c, g, scale * w.grad[c]);
    }
  }
  for (int64_t e = 0; e < in.span; ++e) {  // the padding between rows is never written
    const bool in_row = e >= k.pad && (e - k.pad) % in.stride < k.cols;
    if (!in_row && grad[e * elem] != kUnwritten && bad++ < 6)
      std::printf("  padding element %lld was written\n", (long long)e);
  }
  std::printf("%s %-4s %-4s rows=%lld cols=%lld k=%lld threads=%d pad=%lld target=%d reference=%d weighting=%d "
              "grad_scale=%g\n",
              bad ? "FAIL" : "ok  ", mode, name_of(k.dtype), (long long)k.rows, (long long)k.cols, (long long)k.k,
              k.threads, (long long)k.pad, k.target, k.reference, int(k.weighting), scale);
  if (bad) ++failures;
}

template <typename T>
void run_host(const Case& k, Inputs& in, smskd_loss_rows_topk_args a) {
  const size_t elem = sizeof(T);
  std::vector<unsigned char> grad(in.span * elem, kUnwritten);
  std::vector<float> out(kPerRowOutputs * k.rows);
  smskd::kernels::TopKParams prm{};
  prm.rows = a.rows, prm.cols = a.cols, prm.k = a.k;
  prm.student_stride = prm.reference_stride = prm.grad_stride = in.stride;
  prm.target_stride = 1, prm.mask_stride = in.mask_words;
  prm.target = k.target ? in.target.data() : nullptr;
  prm.values = in.values.data(), prm.indices = in.indices.data(), prm.mask = in.mask.data();
  prm.true_logit = in.true_logit.data(), prm.lse = in.lse.data(), prm.lse_t = in.lse_t.data();
  point_per_row_outputs(prm, out.data(), k.rows);
  prm.temperature = a.temperature, prm.ce_weight = a.ce_weight, prm.kd_weight = a.kd_weight;
  prm.ref_weight = a.ref_weight, prm.weighting = a.weighting, prm.ignore_index = a.ignore_index;
  prm.vectorized = true;  // every buffer's rows share their offset modulo 16 bytes
  prm.grad_scale = k.grad_scale ? &*k.grad_scale : nullptr;
  const T* s = reinterpret_cast<const T*>(in.s_raw.data()) + k.pad;
  const T* r = k.reference ? reinterpret_cast<const T*>(in.r_raw.data()) + k.pad : nullptr;
  smskd::emulation::emulate_topk_rows<T>(k.threads, prm, s, r, reinterpret_cast<T*>(grad.data()) + k.pad);
  compare(k, in, a, out, grad, "host");
}

void run_gpu(const Case& k, Inputs& in, smskd_loss_rows_topk_args a) {
  const size_t elem = bytes_of(k.dtype);
  const DeviceBuffer s(in.s_raw), r(in.r_raw), y(in.target), values(in.values), indices(in.indices), mask(in.mask),
      true_logit(in.true_logit), lse(in.lse), lse_t(in.lse_t), out(std::vector<float>(kPerRowOutputs * k.rows)),
      grad(std::vector<unsigned char>(in.span * elem, kUnwritten)),
      scale(std::vector<float>{k.grad_scale.value_or(1.0f)}), flags(std::vector<uint8_t>(k.rows, 0xff));
  a.student = s.as<unsigned char>() + k.pad * elem;
  a.reference = k.reference ? r.as<unsigned char>() + k.pad * elem : nullptr;
  a.target = k.target ? y.as<int64_t>() : nullptr;
  a.topk_values = values.as<float>(), a.topk_indices = indices.as<int64_t>(), a.kept_mask = mask.as<uint32_t>();
  a.true_logit = true_logit.as<float>(), a.log_sum_exp = lse.as<float>();
  a.log_sum_exp_at_temperature = lse_t.as<float>();
  a.grad = grad.as<unsigned char>() + k.pad * elem;
  a.grad_scale = k.grad_scale ? scale.as<float>() : nullptr;
  a.exact_rest = flags.as<uint8_t>();
  float* o = out.as<float>();
  point_per_row_outputs(a, o, k.rows);
  CHECK_CUDA(smskd_loss_rows_topk_launch(&a, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> host_out(kPerRowOutputs * k.rows);
  std::vector<unsigned char> host_grad(in.span * elem);
  CHECK_CUDA(cudaMemcpy(host_out.data(), o, host_out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(host_grad.data(), grad.ptr, host_grad.size(), cudaMemcpyDeviceToHost));
  compare(k, in, a, host_out, host_grad, "gpu");
}

void run_case(const Case& k, bool host, std::mt19937& rng) {
  Inputs in = make_inputs(k, 2.5f, rng);
  const smskd_loss_rows_topk_args a = base_args(k, in);
  if (!host) return run_gpu(k, in, a);
  if (k.dtype == SMSKD_FLOAT32) run_host<float>(k, in, a);
  if (k.dtype == SMSKD_BFLOAT16) run_host<__nv_bfloat16>(k, in, a);
  if (k.dtype == SMSKD_FLOAT16) run_host<__half>(k, in, a);
}

// bf16 forward + gradient with a target, k = min(64, C / 8) kept classes: the top-k kernel
// against its floor (student read + gradient write + kept mask), beside the dense kernel
// with a dense teacher (launcher's layout) and a device-to-device copy.
int run_bench() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
  const int64_t elements = int64_t{1} << 26;
  const DeviceBuffer ds(std::vector<uint16_t>(elements, 0)), dt(std::vector<uint16_t>(elements, 0)),
      dg(elements * 2), out(kPerRowOutputs * elements * 4);
  smskd::test::EventTimer time_ms;
  const double copy_ms =
      time_ms([&] { CHECK_CUDA(cudaMemcpyAsync(dg.ptr, ds.ptr, elements * 2, cudaMemcpyDeviceToDevice)); });
  const double copy_gbs = 2.0 * elements * 2 / copy_ms / 1e6;
  std::printf("copy bandwidth: %.1f GB/s\n", copy_gbs);
  std::printf("%8s %8s %4s %7s %10s %10s %8s %10s %11s\n", "C", "N", "k", "threads", "topk_ms", "GB/s", "of_copy",
              "dense_ms", "topk/dense");
  for (int64_t cols : {128, 1024, 4096, 32000, 50257, 131072, 262144}) {
    const int64_t rows = elements / cols, k = std::min<int64_t>(64, cols / 8), words = (cols + 31) / 32;
    std::vector<int64_t> indices(rows * k), target(rows, 0);
    std::vector<uint32_t> mask(rows * words, 0u);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < k; ++c) {
        indices[i * k + c] = c * 7 % cols;  // distinct: c * 7 < C for every C here
        mask[i * words + indices[i * k + c] / 32] |= 1u << (indices[i * k + c] % 32);
      }
    const DeviceBuffer di(indices), dm(mask), dy(target), dv(std::vector<float>(rows * k, 0.0f)),
        drow(std::vector<float>(rows, 1.0f + std::log(float(k)))), flags(std::vector<uint8_t>(rows, 0));
    float* o = out.as<float>();
    smskd_loss_rows_args dense{};
    dense.rows = rows, dense.cols = cols, dense.dtype = SMSKD_BFLOAT16;
    dense.student = ds.ptr, dense.teacher = dt.ptr, dense.grad = dg.ptr, dense.target = dy.as<int64_t>();
    dense.student_stride = dense.teacher_stride = dense.grad_stride = cols, dense.target_stride = 1;
    point_per_row_outputs(dense, o, rows);
    dense.temperature = 4.0f, dense.ce_weight = dense.kd_weight = 1.0f;
    dense.weighting = SMSKD_WEIGHT_CONSTANT, dense.ignore_index = -100;
    const double dense_ms = time_ms([&] { CHECK_CUDA(smskd_loss_rows_launch(&dense, nullptr)); });
    int automatic = 0, rows_per_block = 0;
    smskd_loss_rows_config(cols, &automatic, &rows_per_block);
    for (int threads : {8, 16, 32, 256, 512}) {
      smskd_loss_rows_topk_args a{};
      a.rows = rows, a.cols = cols, a.k = k, a.dtype = SMSKD_BFLOAT16;
      a.student = ds.ptr, a.grad = dg.ptr, a.target = dy.as<int64_t>();
      a.student_stride = a.grad_stride = cols, a.target_stride = 1;
      a.topk_values = dv.as<float>(), a.topk_indices = di.as<int64_t>(), a.kept_mask = dm.as<uint32_t>();
      a.kept_mask_stride = words, a.true_logit = a.log_sum_exp = a.log_sum_exp_at_temperature = drow.as<float>();
      a.exact_rest = flags.as<uint8_t>();
      point_per_row_outputs(a, o, rows);
      a.temperature = 4.0f, a.ce_weight = a.kd_weight = 1.0f;
      a.weighting = SMSKD_WEIGHT_CONSTANT, a.ignore_index = -100, a.threads_per_row = threads;
      const double ms = time_ms([&] { CHECK_CUDA(smskd_loss_rows_topk_launch(&a, nullptr)); });
      const double gbs = (double(rows) * cols * 2 * 2 + double(rows) * words * 4) / ms / 1e6;
      std::printf("%8lld %8lld %4lld %6d%s %10.4f %10.1f %7.1f%% %10.4f %10.2fx\n", (long long)cols, (long long)rows,
                  (long long)k, threads, threads == automatic ? "*" : " ", ms, gbs, 100.0 * gbs / copy_gbs, dense_ms,
                  ms / dense_ms);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool host = mode == "--host", quick = mode == "--quick";
  if (mode == "--bench") {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) return 77;
    return run_bench();
  }
  if (!host) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::printf("no CUDA device: skipped\n");
      return 77;
    }
  }
  std::mt19937 rng(2468);
  const std::vector<int64_t> cols_grid = quick ? std::vector<int64_t>{7, 100, 513, 2049, 5003}
                                               : std::vector<int64_t>{1, 7, 100, 129, 513, 2049, 5003, 40000};
  struct InputSet {
    bool target, reference;
    smskd_weighting weighting;
  };
  const InputSet inputs[] = {{true, true, SMSKD_WEIGHT_INVERSE_TCP}, {true, false, SMSKD_WEIGHT_TCP},
                            {false, true, SMSKD_WEIGHT_CONSTANT}, {false, false, SMSKD_WEIGHT_CONSTANT}};
  // GPU: the launcher's layout for every case, and every forced layout; host: every layout.
  const std::vector<int> layouts = host    ? std::vector<int>{8, 16, 32, 256, 512}
                                   : quick ? std::vector<int>{0, 16, 256, 512}
                                           : std::vector<int>{0, 8, 16, 32, 256, 512};
  const int64_t kPads[] = {0, 1, 3};  // odd paddings misalign the rows' packs
  int index = 0;
  // grad_scale in turn: none (NULL), powers of two, a mean's 1/3, a factor above 1.
  const std::optional<float> scales[] = {std::nullopt, 0.25f, 1.0f / 3.0f, -0.5f, 3.5f};
  for (smskd_dtype dtype : {SMSKD_FLOAT32, SMSKD_BFLOAT16, SMSKD_FLOAT16})
    for (int64_t cols : cols_grid) {
      std::vector<int64_t> ks = {1, std::min<int64_t>(cols, 40)};
      if (cols <= 513) ks.push_back(cols);  // no rest
      if (quick) ks.resize(2);
      for (int64_t k : ks)
        for (const InputSet& in : inputs)
          for (int threads : layouts) {
            const int64_t pad = kPads[index % 3];
            const std::optional<float> grad_scale = scales[index++ % 5];
            run_case({dtype, cols > 5000 ? 3 : 6, cols, k, in.target, in.reference, in.weighting, pad, threads,
                      grad_scale},
                     host, rng);
          }
    }
  std::printf(failures ? "%d case(s) FAILED\n" : "all top-k cases passed\n", failures);
  return failures ? 1 : 0;
}
