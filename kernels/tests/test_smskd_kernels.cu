// Standalone test and benchmark of the fused SMSKD row kernels (no PyTorch).
//
//   test_smskd_kernels              correctness grid against a CPU float64 loop
//   test_smskd_kernels --quick      a smaller grid (one size per layout), for compute-sanitizer
//   test_smskd_kernels --bad-target expects the device-side target assertion
//   test_smskd_kernels --bench      bf16 forward+gradient bandwidth vs device copy
//
// The float64 oracle is a plain two-pass implementation of SPEC.md section 2,
// written independently of the kernel's online statistics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "smskd_kernels.h"
#include "smskd_oracle.h"
#include "per_row_outputs.h"
#include "cuda_test_support.h"

namespace {

using namespace smskd::oracle;
using smskd::test::DeviceBuffer;

int failures = 0;

// ---- one test case: inputs laid out with an element offset and a row padding.
struct Case {
  smskd_dtype dtype;
  int64_t rows, cols;
  bool target, teacher, reference;
  smskd_weighting weighting;
  int64_t offset;   // elements before row 0 (misaligns the 16-byte packs when odd)
  int64_t padding;  // stride = cols + padding
  bool in_place;    // grad written over the student
  int threads_per_row = 0;  // 0: the launcher's choice
  std::optional<float> grad_scale = std::nullopt;  // the gradient's factor (in device memory); none: NULL
  int64_t row_cache_bytes = 0;  // smskd_loss_rows_args.row_cache_bytes: 0 none, < 0 the device's most
};

void run_case(const Case& k, std::mt19937& rng) {
  const int64_t stride = k.cols + k.padding;
  const size_t elem = bytes_of(k.dtype);
  const size_t span = static_cast<size_t>(k.offset + k.rows * stride);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int64_t> cls(0, k.cols - 1);

  // Host copies: raw bytes for the device, decoded doubles for the oracle.
  auto make_logits = [&](std::vector<unsigned char>& raw, std::vector<std::vector<double>>& rows) {
    raw.assign(span * elem, 0);
    rows.assign(k.rows, std::vector<double>(k.cols));
    for (int64_t i = 0; i < k.rows; ++i)
      for (int64_t c = 0; c < k.cols; ++c) {
        unsigned char* at = raw.data() + (k.offset + i * stride + c) * elem;
        encode(k.dtype, normal(rng), at);
        rows[i][c] = decode(k.dtype, at);
      }
  };
  std::vector<unsigned char> s_raw, t_raw, r_raw;
  std::vector<std::vector<double>> s, t, r;
  make_logits(s_raw, s);
  if (k.teacher) make_logits(t_raw, t);
  if (k.reference) make_logits(r_raw, r);
  const int64_t ignore = -100;
  std::vector<int64_t> y(k.rows);
  for (int64_t i = 0; i < k.rows; ++i) y[i] = (i % 5 == 3) ? ignore : cls(rng);

  DeviceBuffer ds(span * elem), dt(span * elem), dr(span * elem), dy(k.rows * 8), dg(span * elem),
      dout(kPerRowOutputs * k.rows * sizeof(float)), dscale(std::vector<float>{k.grad_scale.value_or(1.0f)});
  CHECK_CUDA(cudaMemcpy(ds.ptr, s_raw.data(), s_raw.size(), cudaMemcpyHostToDevice));
  if (k.teacher) CHECK_CUDA(cudaMemcpy(dt.ptr, t_raw.data(), t_raw.size(), cudaMemcpyHostToDevice));
  if (k.reference) CHECK_CUDA(cudaMemcpy(dr.ptr, r_raw.data(), r_raw.size(), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dy.ptr, y.data(), k.rows * 8, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(dg.ptr, 0xff, span * elem));  // NaN-like garbage: every element must be written
  CHECK_CUDA(cudaMemset(dout.ptr, 0xff, kPerRowOutputs * k.rows * sizeof(float)));

  auto at_offset = [&](void* base) { return static_cast<unsigned char*>(base) + k.offset * elem; };
  smskd_loss_rows_args a{};
  a.rows = k.rows;
  a.cols = k.cols;
  a.dtype = k.dtype;
  a.student = at_offset(ds.ptr);
  a.student_stride = stride;
  a.teacher = k.teacher ? at_offset(dt.ptr) : nullptr;
  a.teacher_stride = stride;
  a.reference = k.reference ? at_offset(dr.ptr) : nullptr;
  a.reference_stride = stride;
  a.target = k.target ? static_cast<const int64_t*>(dy.ptr) : nullptr;
  a.target_stride = 1;
  a.grad = k.in_place ? const_cast<void*>(a.student) : at_offset(dg.ptr);
  a.grad_stride = stride;
  a.grad_scale = k.grad_scale ? dscale.as<float>() : nullptr;
  float* out = static_cast<float*>(dout.ptr);
  point_per_row_outputs(a, out, k.rows);
  a.temperature = 2.5f;
  a.ce_weight = 0.7f;
  a.kd_weight = 1.3f;
  a.ref_weight = 0.9f;
  a.weighting = k.weighting;
  a.ignore_index = ignore;
  a.threads_per_row = k.threads_per_row;
  a.row_cache_bytes = k.row_cache_bytes;

  CHECK_CUDA(smskd_loss_rows_launch(&a, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> got(kPerRowOutputs * k.rows);
  std::vector<unsigned char> g_raw(span * elem);
  CHECK_CUDA(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(g_raw.data(), k.in_place ? ds.ptr : dg.ptr, g_raw.size(), cudaMemcpyDeviceToHost));

  const double T2 = double(a.temperature) * a.temperature;
  const double value_atol = 2e-5 * (1.0 + T2) * std::log(double(k.cols) + 2.0);
  const double scale = k.grad_scale.value_or(1.0f);  // the gradient is scale times the oracle's, the outputs are not
  int bad = 0;
  double worst_value = 0, worst_grad = 0;
  for (int64_t i = 0; i < k.rows; ++i) {
    const RowWant w = oracle(s[i], k.teacher ? &t[i] : nullptr, k.reference ? &r[i] : nullptr, y[i], k.target, a);
    const auto want = per_row_values(w);
    for (int f = 0; f < kPerRowOutputs; ++f) {
      const double g = got[f * k.rows + i];
      worst_value = std::max(worst_value, std::fabs(g - want[f]));
      if (!close(g, want[f], value_atol, 1e-4) && bad++ < 5)
        std::printf("  row %lld output %d: got %.8g want %.8g\n", (long long)i, f, g, want[f]);
    }
    for (int64_t c = 0; c < k.cols; ++c) {
      const double g = decode(k.dtype, g_raw.data() + (k.offset + i * stride + c) * elem);
      const double want_g = scale * w.grad[c];
      worst_grad = std::max(worst_grad, std::fabs(g - want_g));
      if (!close(g, want_g, 2e-6 * (1.0 + T2) * std::fabs(scale), storage_eps(k.dtype)) && bad++ < 5)
        std::printf("  row %lld grad[%lld]: got %.8g want %.8g\n", (long long)i, (long long)c, g, want_g);
    }
  }
  std::printf("%s %-4s rows=%lld cols=%lld target=%d teacher=%d ref=%d weighting=%d offset=%lld pad=%lld "
              "in_place=%d threads=%d grad_scale=%g  max|err| value %.2e grad %.2e\n",
              bad ? "FAIL" : "ok  ", name_of(k.dtype), (long long)k.rows, (long long)k.cols, k.target, k.teacher,
              k.reference, int(k.weighting), (long long)k.offset, (long long)k.padding, k.in_place, k.threads_per_row,
              scale, worst_value, worst_grad);
  if (bad) ++failures;
}

// quick: one size per layout, for the slow compute-sanitizer runs.
int run_grid(bool quick) {
  std::mt19937 rng(1234);
  const smskd_dtype dtypes[] = {SMSKD_FLOAT32, SMSKD_BFLOAT16, SMSKD_FLOAT16};
  // Columns straddle the layouts (8 lanes <= 128 < 16 lanes <= 512 < warp <= 2048 < 256-thread
  // block <= 16384 < 512-thread block), with odd sizes for scalar heads and tails.
  const std::vector<int64_t> cols_grid =
      quick ? std::vector<int64_t>{7, 300, 2049, 40000}
            : std::vector<int64_t>{1, 7, 64, 128, 129, 512, 513, 1000, 2048, 2049, 5003, 16384, 16385, 40000};
  for (smskd_dtype d : dtypes) {
    for (int64_t cols : cols_grid) {
      const int64_t rows = cols > 5000 ? 6 : 37;
      run_case({d, rows, cols, true, true, true, SMSKD_WEIGHT_INVERSE_TCP, 0, 0, false}, rng);
      run_case({d, rows, cols, true, true, true, SMSKD_WEIGHT_TCP, 1, 3, false}, rng);
      run_case({d, rows, cols, true, true, false, SMSKD_WEIGHT_INVERSE_TCP, 0, 8, true}, rng);
      run_case({d, rows, cols, false, true, false, SMSKD_WEIGHT_CONSTANT, 3, 0, false}, rng);
      run_case({d, rows, cols, true, false, true, SMSKD_WEIGHT_CONSTANT, 0, 1, false}, rng);
      run_case({d, rows, cols, true, false, false, SMSKD_WEIGHT_INVERSE_TCP, 5, 0, true}, rng);
      for (int threads : {8, 16, 32, 256, 512})  // every layout at every size, not only the automatic one
        run_case({d, rows, cols, true, true, true, SMSKD_WEIGHT_INVERSE_TCP, 1, 0, false, threads}, rng);
      // grad_scale (a mean's 1/n, or any factor), in place or not, the rest of the row unscaled
      run_case({d, rows, cols, true, true, true, SMSKD_WEIGHT_TCP, 0, 0, false, 0, 1.0f / 3.0f}, rng);
      run_case({d, rows, cols, true, true, false, SMSKD_WEIGHT_INVERSE_TCP, 1, 8, true, 0, 0.25f}, rng);
      run_case({d, rows, cols, false, true, true, SMSKD_WEIGHT_CONSTANT, 0, 1, false, 0, -3.5f}, rng);
      // The row cache of the block-per-row layouts: as much as the device allows, and 40000 bytes (1250
      // packs of 2 streams: one unrolled pair per thread, i.e. part of the rows over 1024 packs), packed
      // and in place, and with rows whose scalar head differs from row to row (offset 1, padding 3).
      for (int threads : {256, 512}) {
        run_case({d, rows, cols, true, true, true, SMSKD_WEIGHT_INVERSE_TCP, 0, 0, false, threads, 0.25f, -1}, rng);
        run_case({d, rows, cols, true, false, true, SMSKD_WEIGHT_CONSTANT, 0, 8, true, threads, {}, 40000}, rng);
        run_case({d, rows, cols, false, true, false, SMSKD_WEIGHT_CONSTANT, 1, 3, false, threads, {}, -1}, rng);
      }
    }
  }
  std::printf(failures ? "%d case(s) FAILED\n" : "all cases passed\n", failures);
  return failures ? 1 : 0;
}

// A target outside [0, C) must stop the kernel with cudaErrorAssert, not pass silently.
int run_bad_target() {
  const int64_t rows = 4, cols = 100;
  DeviceBuffer ds(rows * cols * 4), dy(rows * 8), dout(kPerRowOutputs * rows * 4);
  CHECK_CUDA(cudaMemset(ds.ptr, 0, rows * cols * 4));
  const int64_t y[rows] = {1, 2, cols, 3};
  CHECK_CUDA(cudaMemcpy(dy.ptr, y, sizeof(y), cudaMemcpyHostToDevice));
  smskd_loss_rows_args a{};
  a.rows = rows;
  a.cols = cols;
  a.dtype = SMSKD_FLOAT32;
  a.student = ds.ptr;
  a.student_stride = cols;
  a.target = static_cast<const int64_t*>(dy.ptr);
  a.target_stride = 1;
  float* out = static_cast<float*>(dout.ptr);
  point_per_row_outputs(a, out, rows);
  a.temperature = 1.0f;
  a.ce_weight = 1.0f;
  a.weighting = SMSKD_WEIGHT_CONSTANT;
  a.ignore_index = -100;
  CHECK_CUDA(smskd_loss_rows_launch(&a, nullptr));
  const cudaError_t status = cudaDeviceSynchronize();
  std::printf("bad target: synchronize returned %s\n", cudaGetErrorString(status));
  return status == cudaErrorAssert ? 0 : 1;
}

// bf16 forward + gradient with target, teacher and reference; bandwidth against
// the floor N*C*(3 reads + 1 write)*2 bytes, beside a device-to-device copy.
int run_bench() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
  const int64_t elements = int64_t{1} << 26;
  DeviceBuffer ds(elements * 2), dt(elements * 2), dr(elements * 2), dg(elements * 2), dy(elements * 8),
      dout(kPerRowOutputs * elements * 4);
  CHECK_CUDA(cudaMemset(ds.ptr, 0, elements * 2));
  CHECK_CUDA(cudaMemset(dt.ptr, 0, elements * 2));
  CHECK_CUDA(cudaMemset(dr.ptr, 0, elements * 2));
  CHECK_CUDA(cudaMemset(dy.ptr, 0, elements * 8));
  smskd::test::EventTimer time_ms;
  const double copy_ms = time_ms([&] { CHECK_CUDA(cudaMemcpyAsync(dg.ptr, ds.ptr, elements * 2, cudaMemcpyDeviceToDevice)); });
  const double copy_gbs = 2.0 * elements * 2 / copy_ms / 1e6;
  std::printf("copy bandwidth: %.1f GB/s\n", copy_gbs);
  std::printf("%8s %8s %7s %10s %10s %8s\n", "C", "N", "threads", "ms", "GB/s", "of_copy");
  for (int64_t cols : {32, 128, 512, 1024, 2048, 4096, 16384, 32768, 131072, 262144}) {
    int automatic = 0, rows_per_block = 0;
    smskd_loss_rows_config(cols, &automatic, &rows_per_block);
    // Every layout, to tune the automatic choice (marked *), the block-per-row ones also with the row
    // cache (as much as the device allows; marked c).
    const std::pair<int, bool> layouts[] = {{8, false}, {16, false}, {32, false}, {256, false},
                                            {256, true}, {512, false}, {512, true}};
    for (const auto& [threads, cached] : layouts) {
      const int64_t rows = elements / cols;
      smskd_loss_rows_args a{};
      a.rows = rows, a.cols = cols, a.dtype = SMSKD_BFLOAT16;
      a.student = ds.ptr, a.teacher = dt.ptr, a.reference = dr.ptr, a.grad = dg.ptr;
      a.student_stride = a.teacher_stride = a.reference_stride = a.grad_stride = cols;
      a.target = static_cast<const int64_t*>(dy.ptr), a.target_stride = 1;
      float* out = static_cast<float*>(dout.ptr);
      point_per_row_outputs(a, out, rows);
      a.temperature = 4.0f, a.ce_weight = a.kd_weight = a.ref_weight = 1.0f;
      a.weighting = SMSKD_WEIGHT_INVERSE_TCP, a.ignore_index = -100;
      a.threads_per_row = threads;
      a.row_cache_bytes = cached ? -1 : 0;
      const double ms = time_ms([&] { CHECK_CUDA(smskd_loss_rows_launch(&a, nullptr)); });
      const double gbs = double(rows) * cols * 4 * 2 / ms / 1e6;
      std::printf("%8lld %8lld %6d%s%s %10.4f %10.1f %7.1f%%\n", (long long)cols, (long long)rows, threads,
                  threads == automatic && !cached ? "*" : " ", cached ? "c" : " ", ms, gbs, 100.0 * gbs / copy_gbs);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  if (mode == "--bad-target") return run_bad_target();
  if (mode == "--bench") return run_bench();
  return run_grid(mode == "--quick");
}
