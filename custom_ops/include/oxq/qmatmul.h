// ox-quant custom ops: problem description shared by the CPU and CUDA kernels.
// No ONNX Runtime dependency here: the kernels see plain pointers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace oxq {

// Y[M, N] = A[M, K] @ W[K, N] (+ bias[N]), with
//   W[k, n] = (q[n, k] - zp[g, b]) * scale[g, b],   b = k / block_size,  g = n / group.
// q: codes of `bits` bits, packed per column n as n_blocks blobs of `blob` bytes
//    (LSB-first bitstream, code i of a block at bits [i*bits, (i+1)*bits) of its blob).
// scale: [n_groups * n_blocks] (index g * n_blocks + b).
// zp:    packed, n_groups rows of zp_row bytes, each an LSB-first bitstream of n_blocks codes;
//        nullptr means zp = 2**(bits-1) everywhere.
struct QMatMulShape {
  int64_t M = 0;
  int64_t K = 0;
  int64_t N = 0;
  int bits = 4;
  int64_t block_size = 32;
  int64_t group = 1;  // channel_group_size: consecutive output channels sharing a scale
  // accuracy_level: 4 = int8 activations (A quantized per block of K, integer dot products);
  // anything else = float32 arithmetic. Only the CPU kernels read it.
  int accuracy_level = 0;

  QMatMulShape() = default;
  QMatMulShape(int64_t m, int64_t k, int64_t n, int b, int64_t block, int64_t g, int level = 0)
      : M(m), K(k), N(n), bits(b), block_size(block), group(g), accuracy_level(level) {}

  bool int8_activations() const { return accuracy_level == 4; }

  int64_t n_blocks() const { return (K + block_size - 1) / block_size; }
  int64_t blob() const { return (block_size * bits + 7) / 8; }
  int64_t n_groups() const { return (N + group - 1) / group; }
  int64_t zp_row() const { return (n_blocks() * bits + 7) / 8; }
  int64_t packed_bytes() const { return N * n_blocks() * blob(); }
  int64_t n_scales() const { return n_groups() * n_blocks(); }
  int64_t zp_bytes() const { return n_groups() * zp_row(); }
};

#ifdef __CUDACC__
#define OXQ_HOST_DEVICE __host__ __device__
#else
#define OXQ_HOST_DEVICE
#endif

// Code `index` of an LSB-first bitstream of `bits`-bit codes (reads only the bytes it needs).
OXQ_HOST_DEVICE inline uint32_t bitstream_code(const uint8_t* row, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = row[byte] >> shift;
  if (shift + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << (8 - shift);
  return v & ((1u << bits) - 1u);
}

// Runs fn(data, i) for i in [0, n_tasks), possibly in parallel.
struct TaskRunner {
  virtual ~TaskRunner() = default;
  virtual void run(size_t n_tasks, void (*fn)(void*, size_t), void* data) const = 0;
};

// Serial runner (tests, fallback).
struct SerialRunner final : TaskRunner {
  void run(size_t n_tasks, void (*fn)(void*, size_t), void* data) const override {
    for (size_t i = 0; i < n_tasks; ++i) fn(data, i);
  }
};

// CPU kernel. zp and bias may be nullptr. With s.accuracy_level == 4 each row of A is first
// quantized to int8 per block of K (symmetric: scale = max|a| / 127, q = round-half-even(a *
// (127 / max|a|))) and the block dot products are exact integer sums; otherwise float32 throughout.
void qmatmul_cpu(const QMatMulShape& s, const float* A, const uint8_t* B, const float* scales,
                 const uint8_t* zp, const float* bias, float* Y, const TaskRunner& runner);

// Weights repacked once, when the kernel is created from constant B / scales / zero points, into a
// layout for the int8-activation kernel (accuracy_level 4, M <= 8, bits 2..7, AVX2): tiles of 8
// columns, per block groups of 32 codes as 4-bit nibbles (bits <= 4) or bytes (5..7) for vpmaddubsw,
// with the scales and scale * zero point of each tile and block stored lane-ordered next to them.
struct RepackedB;
struct RepackedDeleter {
  void operator()(RepackedB* p) const;
};
using RepackedPtr = std::unique_ptr<RepackedB, RepackedDeleter>;

// nullptr when the layout does not apply (accuracy_level != 4, bits 8, no AVX2 on this CPU).
// zp may be nullptr (symmetric). Sizes must already match s (B: packed_bytes(), ...).
RepackedPtr repack_b(const QMatMulShape& s, const uint8_t* B, const float* scales, const uint8_t* zp);
// Bytes the repacked copy holds (codes + scale tables).
size_t repacked_bytes(const RepackedB& w);
// Y = A @ W (+ bias) with the repacked weights; s.M is the number of rows. Returns false (and does
// nothing) when the repacked kernel does not apply to this call (M > 8, AVX2 disabled by
// OX_QUANT_OPS_ISA=portable): the caller then runs qmatmul_cpu on the original inputs, which gives
// bit-identical results on the AVX2 path.
bool qmatmul_cpu_repacked(const QMatMulShape& s, const RepackedB& w, const float* A, const float* bias, float* Y,
                          const TaskRunner& runner);
// Calls of qmatmul_cpu_repacked that ran (for tests: shows the repacked path was taken).
uint64_t repacked_runs();

// Half <-> float conversions (F16C when the CPU has it).
void half_to_float(const uint16_t* in, float* out, size_t n);
void float_to_half(const float* in, uint16_t* out, size_t n);

// Which CPU code path qmatmul_cpu uses: "avx2" or "portable".
const char* cpu_isa();

}  // namespace oxq
