// The top-k row kernel's arithmetic run on the CPU, thread by thread, on inputs
// from files; tests/test_cuda_topk_host_math.py writes them and compares the
// outputs with the float64 reference backend (no GPU needed).
//
//   topk_rows_host DIR
//
// DIR/meta.txt: rows cols k dtype(0 f32, 1 bf16, 2 f16) has_target has_reference
//   temperature ce_weight kd_weight ref_weight weighting(0 inverse_tcp, 1 tcp, 2 constant)
//   ignore_index pad vectorized [grad_scale]
// (a 15th field: the gradient's factor, passed as TopKParams::grad_scale; absent: NULL)
// DIR/{student,reference}.bin: rows x cols raw dtype; target.bin, indices.bin: int64;
// values.bin (rows x k), true_logit.bin, lse.bin, lse_t.bin (rows): float32.
// Rows are laid out with stride cols + pad, the first at element pad of a
// 16-byte aligned buffer, so pad = 1 misaligns rows by varying amounts.
// For every layout (8, 16, 32, 256, 512 threads per row) it writes
// DIR/rows_<threads>.bin (the per-row outputs: kPerRowOutputs x rows float32) and
// DIR/grad_<threads>.bin (rows x cols raw dtype). What is emulated: each thread's
// sweep A, the merge the shuffles and shared memory do (in thread order), the
// gather, the dense gradient sweep, and the kept classes' rewrite after it.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "topk_emulation.h"
#include "per_row_outputs.h"

namespace {

using namespace smskd::kernels;
using smskd::emulation::emulate_topk_rows;

struct Meta {
  long long rows, cols, k;
  int dtype, has_target, has_reference;
  float temperature, ce_weight, kd_weight, ref_weight;
  int weighting;
  long long ignore_index, pad;
  int vectorized;
  bool has_grad_scale;
  float grad_scale;
};

std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  std::vector<unsigned char> data(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(data.data(), 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

template <typename V>
std::vector<V> read_array(const std::string& path, size_t count) {
  const auto raw = read_file(path, count * sizeof(V));
  std::vector<V> out(count);
  std::memcpy(out.data(), raw.data(), raw.size());
  return out;
}

// Rows of `elem`-byte values with stride cols + pad, the first at element pad of a 16-byte aligned buffer.
struct PaddedRows {
  std::vector<uint64_t> storage;  // uint64_t: 8-byte aligned; the pack path needs 16, see base()
  size_t elem;
  long long cols, pad;
  PaddedRows(long long rows, long long cols_, long long pad_, size_t elem_) : elem(elem_), cols(cols_), pad(pad_) {
    storage.assign(((rows * (cols + pad) + pad) * elem) / 8 + 4, 0);
  }
  unsigned char* base() {  // 16-byte aligned start
    auto p = reinterpret_cast<uintptr_t>(storage.data());
    return reinterpret_cast<unsigned char*>((p + 15) / 16 * 16);
  }
  unsigned char* at(long long row) { return base() + (pad + row * (cols + pad)) * elem; }
};

template <typename T>
void run(const std::string& dir, const Meta& m) {
  const size_t elem = sizeof(T);
  const long long stride = m.cols + m.pad;
  PaddedRows student(m.rows, m.cols, m.pad, elem), reference(m.rows, m.cols, m.pad, elem);
  const auto s_raw = read_file(dir + "/student.bin", m.rows * m.cols * elem);
  std::vector<unsigned char> r_raw;
  if (m.has_reference) r_raw = read_file(dir + "/reference.bin", m.rows * m.cols * elem);
  for (long long i = 0; i < m.rows; ++i) {
    std::memcpy(student.at(i), s_raw.data() + i * m.cols * elem, m.cols * elem);
    if (m.has_reference) std::memcpy(reference.at(i), r_raw.data() + i * m.cols * elem, m.cols * elem);
  }
  const auto target = m.has_target ? read_array<int64_t>(dir + "/target.bin", m.rows) : std::vector<int64_t>();
  const auto values = read_array<float>(dir + "/values.bin", m.rows * m.k);
  const auto indices = read_array<int64_t>(dir + "/indices.bin", m.rows * m.k);
  const auto true_logit = read_array<float>(dir + "/true_logit.bin", m.rows);
  const auto lse = read_array<float>(dir + "/lse.bin", m.rows);
  const auto lse_t = read_array<float>(dir + "/lse_t.bin", m.rows);
  // The kept-class bitmask, as the operator builds it (bit j % 32 of word j / 32).
  const long long words = (m.cols + 31) / 32;
  std::vector<uint32_t> mask(m.rows * words, 0u);
  for (long long i = 0; i < m.rows; ++i)
    for (long long c = 0; c < m.k; ++c) {
      const int64_t j = clamp_class(indices[i * m.k + c], m.cols);
      mask[i * words + j / 32] |= 1u << (j % 32);
    }

  TopKParams prm{};
  prm.rows = m.rows, prm.cols = m.cols, prm.k = m.k;
  prm.student_stride = prm.reference_stride = prm.grad_stride = stride;
  prm.target_stride = 1, prm.mask_stride = words;
  prm.target = m.has_target ? target.data() : nullptr;
  prm.values = values.data(), prm.indices = indices.data(), prm.mask = mask.data();
  prm.true_logit = true_logit.data(), prm.lse = lse.data(), prm.lse_t = lse_t.data();
  std::vector<float> out(kPerRowOutputs * m.rows);
  point_per_row_outputs(prm, out.data(), m.rows);
  prm.temperature = m.temperature, prm.ce_weight = m.ce_weight, prm.kd_weight = m.kd_weight;
  prm.ref_weight = m.ref_weight, prm.weighting = static_cast<smskd_weighting>(m.weighting);
  prm.ignore_index = m.ignore_index, prm.vectorized = m.vectorized != 0;
  prm.grad_scale = m.has_grad_scale ? &m.grad_scale : nullptr;

  const T* s = reinterpret_cast<const T*>(student.at(0));
  const T* r = m.has_reference ? reinterpret_cast<const T*>(reference.at(0)) : nullptr;
  for (int threads : {8, 16, 32, 256, 512}) {
    PaddedRows grad(m.rows, m.cols, m.pad, elem);
    std::memset(grad.base(), 0xff, (m.pad + m.rows * stride) * elem);  // every entry must be written
    T* g = reinterpret_cast<T*>(grad.at(0));
    emulate_topk_rows<T>(threads, prm, s, r, g);
    std::vector<unsigned char> dense(m.rows * m.cols * elem);
    for (long long i = 0; i < m.rows; ++i) std::memcpy(dense.data() + i * m.cols * elem, grad.at(i), m.cols * elem);
    write_file(dir + "/rows_" + std::to_string(threads) + ".bin", out.data(), out.size() * sizeof(float));
    write_file(dir + "/grad_" + std::to_string(threads) + ".bin", dense.data(), dense.size());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  Meta m{};
  FILE* f = std::fopen((dir + "/meta.txt").c_str(), "r");
  const int fields = f ? std::fscanf(f, "%lld %lld %lld %d %d %d %f %f %f %f %d %lld %lld %d %f", &m.rows, &m.cols,
                                     &m.k, &m.dtype, &m.has_target, &m.has_reference, &m.temperature, &m.ce_weight,
                                     &m.kd_weight, &m.ref_weight, &m.weighting, &m.ignore_index, &m.pad,
                                     &m.vectorized, &m.grad_scale)
                       : 0;
  if (fields != 14 && fields != 15) {
    std::fprintf(stderr, "cannot parse %s/meta.txt\n", dir.c_str());
    return 2;
  }
  m.has_grad_scale = fields == 15;
  std::fclose(f);
  if (m.dtype == 0) run<float>(dir, m);
  if (m.dtype == 1) run<__nv_bfloat16>(dir, m);
  if (m.dtype == 2) run<__half>(dir, m);
  std::printf("ok\n");
  return 0;
}
