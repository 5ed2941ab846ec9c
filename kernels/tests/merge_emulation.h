// merge_row_statistics (kernels/smskd_row_kernel.cuh) emulated on the CPU for the host tests of
// both kernel forms: the threads' statistics merged in its steps (the maxima, each thread's sums
// rescaled to them, added), the sums in thread order, which differs from the device's butterfly
// order only in rounding.
#pragma once

#include <vector>

#include "smskd_row_kernel.cuh"

namespace smskd {
namespace emulation {

template <typename Streams, typename Stats>
Stats merged(std::vector<Stats>& threads, float k1, float kT) {
  Stats total;
  for (const Stats& mine : threads) kernels::max_of_maxima<Streams>(total, mine);
  for (Stats& mine : threads) {
    kernels::rescale_to_maxima<Streams>(mine, total, k1, kT);
    kernels::add_sums<Streams>(total, mine);
  }
  return total;
}

}  // namespace emulation
}  // namespace smskd
