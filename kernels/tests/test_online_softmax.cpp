// Standalone test of kernels/online_softmax.h against a double-precision
// two-pass computation. Built and run by CMake/ctest; no PyTorch involved.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "online_softmax.h"

namespace {

int failures = 0;

void expect_close(double got, double want, double rtol, const char* what, int n) {
  const bool both_inf = std::isinf(got) && std::isinf(want) && (got > 0) == (want > 0);
  if (both_inf || std::fabs(got - want) <= rtol * (1.0 + std::fabs(want))) return;
  std::printf("FAIL %s (n=%d): got %.9g want %.9g\n", what, n, got, want);
  ++failures;
}

double two_pass_lse(const std::vector<float>& x) {
  double m = -INFINITY;
  for (float v : x) m = std::fmax(m, v);
  if (m == -INFINITY) return -INFINITY;
  double s = 0;
  for (float v : x) s += std::exp(double(v) - m);
  return m + std::log(s);
}

double two_pass_softmax_mean(const std::vector<float>& x, const std::vector<float>& v) {
  const double lse = two_pass_lse(x);
  double acc = 0;
  for (size_t i = 0; i < x.size(); ++i)
    if (x[i] != -INFINITY) acc += std::exp(double(x[i]) - lse) * v[i];
  return acc;
}

// Streams x one value at a time, and also in two halves merged afterwards.
void check_row(const std::vector<float>& x, const std::vector<float>& v, const char* what) {
  smskd::OnlineSoftmax whole, left, right;
  const size_t half = x.size() / 2;
  for (size_t i = 0; i < x.size(); ++i) {
    whole.add(x[i], v[i]);
    (i < half ? left : right).add(x[i], v[i]);
  }
  left.merge(right);
  const int n = static_cast<int>(x.size());
  expect_close(whole.log_sum_exp(), two_pass_lse(x), 1e-5, what, n);
  expect_close(left.log_sum_exp(), two_pass_lse(x), 1e-5, what, n);
  if (two_pass_lse(x) != -INFINITY) {
    expect_close(whole.softmax_mean(), two_pass_softmax_mean(x, v), 1e-4, what, n);
    expect_close(left.softmax_mean(), two_pass_softmax_mean(x, v), 1e-4, what, n);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int n : {1, 2, 7, 64, 1000, 32000}) {
    std::vector<float> x(n), v(n);
    for (int i = 0; i < n; ++i) {
      x[i] = normal(rng);
      v[i] = normal(rng);
    }
    check_row(x, v, "random");
    for (auto& e : x) e *= 3000.0f;  // magnitudes near 1e4: exp must not overflow
    check_row(x, v, "large magnitude");
    x[0] = -INFINITY;  // a masked entry
    if (n > 1) check_row(x, v, "masked entry");
  }
  check_row({-INFINITY, -INFINITY}, {1.0f, 2.0f}, "all masked");
  check_row({5.0f, 5.0f, 5.0f}, {1.0f, 2.0f, 3.0f}, "all equal");

  smskd::OnlineSoftmax with_nan;
  with_nan.add(1.0f);
  with_nan.add(NAN);
  if (!std::isnan(with_nan.log_sum_exp())) {
    std::printf("FAIL: NaN input must give a NaN log-sum-exp\n");
    ++failures;
  }
  if (failures == 0) std::printf("online_softmax: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
