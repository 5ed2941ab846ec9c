// What the standalone CUDA kernel tests share: a checked-call macro, an owning device buffer and
// an event timer for their bandwidth lines. Header-only, no PyTorch.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

// Any CUDA error ends the test binary with status 2 and the failing call's text.
#define CHECK_CUDA(call)                                                                                \
  do {                                                                                                  \
    const cudaError_t status_ = (call);                                                                 \
    if (status_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(2);                                                                                     \
    }                                                                                                   \
  } while (0)

namespace smskd::test {

// Device memory freed on scope exit; optionally filled from a host vector.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { CHECK_CUDA(cudaMalloc(&ptr, bytes ? bytes : 1)); }
  template <typename V>
  explicit DeviceBuffer(const std::vector<V>& host) : DeviceBuffer(host.size() * sizeof(V)) {
    if (!host.empty()) CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename V>
  V* as() const { return static_cast<V*>(ptr); }
};

// Mean milliseconds of body() over 20 calls after 3 warm-up calls, timed by CUDA events.
class EventTimer {
 public:
  EventTimer() {
    CHECK_CUDA(cudaEventCreate(&start_));
    CHECK_CUDA(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  template <typename Body>
  double operator()(Body&& body) {
    for (int i = 0; i < 3; ++i) body();
    const int iters = 20;
    CHECK_CUDA(cudaEventRecord(start_));
    for (int i = 0; i < iters; ++i) body();
    CHECK_CUDA(cudaEventRecord(stop_));
    CHECK_CUDA(cudaEventSynchronize(stop_));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start_, stop_));
    return double(ms) / iters;
  }

 private:
  cudaEvent_t start_, stop_;
};

}  // namespace smskd::test
