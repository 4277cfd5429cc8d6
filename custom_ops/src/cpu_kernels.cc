// CPU kernels for ox_quant.MatMulNBits (see custom_ops/README.md for the op's semantics).
//
// Two paths, both threaded over output channels N through a TaskRunner:
//  * M == 1 (decoding): stream the packed weights once. Per column and block,
//    dot(a_blk, q_blk) is accumulated from codes unpacked 8 at a time, and
//    y += s * (dot - zp * sum(a_blk)), so neither the scale nor the zero point touch
//    the inner loop.
//  * M > 1: dequantize a tile of NT columns once into a float buffer (w = (q - zp) * s),
//    then a register-blocked dot-product GEMM (4 rows x 3 columns) over K chunks.
//  * accuracy_level 4 and M <= kInt8MaxRows: A quantized to int8 per block, exact integer block
//    dot products (vpmaddwd on codes masked in place), float accumulation across blocks.
//  * the same with weights repacked at kernel creation (constant B, bits 2..7): nibble/byte codes
//    for vpmaddubsw, 8-column tiles (see "Repacked weights" below); bit-identical to the above.
// The AVX2/FMA versions are chosen at run time (__builtin_cpu_supports); a portable C++
// version runs everywhere else (and when OX_QUANT_OPS_ISA=portable).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "oxq/qmatmul.h"

#if defined(__x86_64__) || defined(_M_X64)
#define OXQ_X86 1
#include <immintrin.h>
#endif

namespace oxq {
namespace {

constexpr int64_t kTileN = 24;    // columns dequantized per task (M > 1)
constexpr int64_t kChunkK = 512;  // K chunk of the GEMM (keeps A's chunk in L2)
constexpr int64_t kColsPerTaskM1 = 16;
constexpr int64_t kColsPerTaskI8 = 16;   // columns per task, int8-activation path
// accuracy_level 4 quantizes A only for M <= kInt8MaxRows (decoding, small batches); larger M
// take the float path, which is faster there (dequantized tile + float GEMM). Keep in sync with
// custom_ops/README.md and ox_quant/runtime/custom_ops.py (INT8_MAX_ROWS).
constexpr int64_t kInt8MaxRows = 8;

// Activations quantized to int8 (accuracy_level 4), one row of A after another.
// Row m, block b: sa = max|a| / 127, qa[k] = round-half-even(a[k] * (127 / max|a|)) in [-127, 127].
// The codes are stored as int16 in blocks padded with zeros to a multiple of 16 (`bs16`), so that the
// kernels may read whole groups of 16 codes (the codes past the block meet a zero activation).
// AVX2 layout ("shifted"): code j of a group of 16 is multiplied by its packed window masked in place,
// i.e. by q << s_j with s_j = (j * bits) % 8, so the stored activation is qa << (7 - s_j) and each
// product is qa * q * 128; `scale` then holds sa / 128. Portable layout: qa itself, `scale` = sa.
struct QuantA {
  int64_t bs16 = 0;    // stored codes per block
  int64_t flush = 1;   // groups of 16 codes summed in int32 before conversion to float (no overflow)
  int64_t stride = 0;  // int16 values per row: n_blocks * bs16
  std::vector<int16_t> q;       // [M][stride]
  std::vector<float> scale;     // [M][n_blocks]: multiplies the integer dot of block b
  std::vector<float> asum;      // [M][n_blocks]: sa * sum(qa) over the block (sum of the dequantized block)
};

struct Problem {
  QMatMulShape s;
  int64_t nb, blob, zp_row;
  const float* A;
  const uint8_t* B;
  const uint8_t* B_end;
  const float* scales;
  const uint8_t* zp;
  const uint8_t* zp_end;
  const float* bias;
  float* Y;
  std::vector<float> asum;  // [n_blocks] (M == 1, float path)
  const QuantA* qa = nullptr;  // int8-activation path

  float scale(int64_t n, int64_t b) const { return scales[(n / s.group) * nb + b]; }
  float zero(int64_t n, int64_t b) const {
    if (!zp) return static_cast<float>(1 << (s.bits - 1));
    return static_cast<float>(bitstream_code(zp + (n / s.group) * zp_row, b, s.bits));
  }
  int64_t block_len(int64_t b) const { return std::min(s.block_size, s.K - b * s.block_size); }
  const uint8_t* blob_ptr(int64_t n, int64_t b) const { return B + (n * nb + b) * blob; }
};

// 8 consecutive bytes at p (fewer near the end of B, zero filled).
inline uint64_t load_group(const uint8_t* p, const uint8_t* end) {
  uint64_t x = 0;
  const int64_t avail = end - p;
  std::memcpy(&x, p, static_cast<size_t>(avail >= 8 ? 8 : avail));
  return x;
}

// Group of `count` (<= 8) codes starting at p: only the bytes they occupy are read.
inline uint64_t load_partial(const uint8_t* p, int count, int bits) {
  uint64_t x = 0;
  std::memcpy(&x, p, static_cast<size_t>((count * bits + 7) / 8));
  return x;
}

bool use_avx2() {
#ifdef OXQ_X86
  const char* isa = std::getenv("OX_QUANT_OPS_ISA");
  if (isa && std::strcmp(isa, "portable") == 0) return false;
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------
// Portable path

void m1_portable(const Problem& p, int64_t n0, int64_t n1) {
  const int bits = p.s.bits;
  const uint64_t mask = (1u << bits) - 1u;
  for (int64_t n = n0; n < n1; ++n) {
    float y = 0.f;
    for (int64_t b = 0; b < p.nb; ++b) {
      const int64_t len = p.block_len(b);
      const float* a = p.A + b * p.s.block_size;
      const uint8_t* q = p.blob_ptr(n, b);
      float dot = 0.f;
      for (int64_t i = 0; i < len; i += 8) {
        const int cnt = static_cast<int>(std::min<int64_t>(8, len - i));
        const uint64_t x = cnt == 8 ? load_group(q + (i / 8) * bits, p.B_end) : load_partial(q + (i / 8) * bits, cnt, bits);
        for (int j = 0; j < cnt; ++j) dot += a[i + j] * static_cast<float>((x >> (j * bits)) & mask);
      }
      const float sc = p.scale(n, b);
      y += sc * (dot - p.zero(n, b) * p.asum[b]);
    }
    p.Y[n] = y + (p.bias ? p.bias[n] : 0.f);
  }
}

// w[0..K) = dequantized column n, w[K..K8) = 0.
void dequant_column_portable(const Problem& p, int64_t n, float* w, int64_t k8) {
  const int bits = p.s.bits;
  const uint64_t mask = (1u << bits) - 1u;
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t len = p.block_len(b);
    const uint8_t* q = p.blob_ptr(n, b);
    const float sc = p.scale(n, b), off = -p.zero(n, b) * sc;
    float* out = w + b * p.s.block_size;
    for (int64_t i = 0; i < len; i += 8) {
      const int cnt = static_cast<int>(std::min<int64_t>(8, len - i));
      const uint64_t x = cnt == 8 ? load_group(q + (i / 8) * bits, p.B_end) : load_partial(q + (i / 8) * bits, cnt, bits);
      for (int j = 0; j < cnt; ++j) out[i + j] = static_cast<float>((x >> (j * bits)) & mask) * sc + off;
    }
  }
  for (int64_t k = p.s.K; k < k8; ++k) w[k] = 0.f;
}

// C[i, j] += sum_k A[i, k] * W[j][k] for i < mr, j < nr, k in [k0, k1).
void micro_portable(const float* A, int64_t lda, const float* const* W, int mr, int nr, int64_t k0, int64_t k1,
                    float* C, int64_t ldc) {
  for (int i = 0; i < mr; ++i) {
    const float* a = A + i * lda;
    for (int j = 0; j < nr; ++j) {
      const float* w = W[j];
      float acc = 0.f;
      for (int64_t k = k0; k < k1; ++k) acc += a[k] * w[k];
      C[i * ldc + j] += acc;
    }
  }
}


// Int8 activations: rows [m0, m1) x columns [n0, n1), plain integer arithmetic.
void i8_portable(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const QuantA& qa = *p.qa;
  const int bits = p.s.bits;
  const int64_t nb = p.nb;
  for (int64_t n = n0; n < n1; ++n) {
    const float* sp = p.scales + (n / p.s.group) * nb;
    for (int64_t m = m0; m < m1; ++m) {
      const int16_t* a = qa.q.data() + m * qa.stride;
      const float* sa = qa.scale.data() + m * nb;
      const float* as = qa.asum.data() + m * nb;
      float y = 0.f, corr = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t len = p.block_len(b);
        const uint8_t* q = p.blob_ptr(n, b);
        const int16_t* ab = a + b * qa.bs16;
        int64_t dot = 0;
        for (int64_t i = 0; i < len; ++i) dot += static_cast<int64_t>(ab[i]) * static_cast<int64_t>(bitstream_code(q, i, bits));
        y += (sa[b] * sp[b]) * static_cast<float>(dot);
        corr += sp[b] * p.zero(n, b) * as[b];
      }
      p.Y[m * p.s.N + n] = y - corr + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

// ------------------------------------------------------------------------------
// AVX2 path
#ifdef OXQ_X86

struct Unpack8 {
  __m256i ctl, shv, mask;
};

__attribute__((target("avx2,fma"))) Unpack8 make_unpack8(int bits) {
  alignas(32) uint8_t ctl[32];
  alignas(32) int32_t shv[8];
  for (int j = 0; j < 8; ++j) {
    const int start = (j * bits) / 8;  // first byte of code j (the same 8 bytes sit in both 128-bit halves)
    for (int t = 0; t < 4; ++t) ctl[4 * j + t] = static_cast<uint8_t>(start + t);
    shv[j] = (j * bits) % 8;
  }
  Unpack8 u;
  u.ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctl));
  u.shv = _mm256_load_si256(reinterpret_cast<const __m256i*>(shv));
  u.mask = _mm256_set1_epi32((1 << bits) - 1);
  return u;
}

// 8 codes (LSB-first, `bits` each, in the low bytes of x) as 8 floats.
__attribute__((target("avx2,fma"))) inline __m256 unpack8(uint64_t x, const Unpack8& u) {
  __m256i v = _mm256_set1_epi64x(static_cast<long long>(x));
  v = _mm256_shuffle_epi8(v, u.ctl);
  v = _mm256_srlv_epi32(v, u.shv);
  v = _mm256_and_si256(v, u.mask);
  return _mm256_cvtepi32_ps(v);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) inline __m256 load_tail(const float* a, int cnt) {
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < cnt; ++j) t[j] = a[j];
  return _mm256_load_ps(t);
}

// dot(a[0..len), codes of one block) for a block that may be partial or near the end of B
// (every load bounds-checked).
__attribute__((target("avx2,fma"))) __m256 block_dot_checked(const Problem& p, const float* a, const uint8_t* q,
                                                            int64_t len, const Unpack8& u) {
  const int bits = p.s.bits;
  __m256 acc = _mm256_setzero_ps();
  const int64_t full = len / 8;
  for (int64_t g = 0; g < full; ++g)
    acc = _mm256_fmadd_ps(unpack8(load_group(q + g * bits, p.B_end), u), _mm256_loadu_ps(a + 8 * g), acc);
  const int rest = static_cast<int>(len - 8 * full);
  if (rest) acc = _mm256_fmadd_ps(unpack8(load_partial(q + full * bits, rest, bits), u), load_tail(a + 8 * full, rest), acc);
  return acc;
}

// sum_b scale[b] * zp[b] * asum[b] over the blocks of one channel group (zp row may be null).
__attribute__((target("avx2,fma"))) float zero_correction(const Problem& p, const float* sp, const uint8_t* zrow,
                                                         const Unpack8& zu, const float* asum) {
  const int bits = p.s.bits;
  const int64_t nb = p.nb;
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  if (zrow) {
    // 8 zero points = `bits` bytes; the row holds ceil(nb*bits/8) bytes. Plain 8-byte loads while
    // they stay inside the zero-point input, `bits`-byte copies after.
    for (; b + 8 <= nb; b += 8) {
      const uint8_t* z = zrow + (b / 8) * bits;
      uint64_t x;
      if (z + 8 <= p.zp_end) std::memcpy(&x, z, 8);
      else x = load_partial(z, 8, bits);
      acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sp + b), _mm256_loadu_ps(asum + b)), unpack8(x, zu), acc);
    }
    float t = hsum(acc);
    for (; b < nb; ++b) t += sp[b] * asum[b] * static_cast<float>(bitstream_code(zrow, b, bits));
    return t;
  }
  for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(sp + b), _mm256_loadu_ps(asum + b), acc);
  float t = hsum(acc);
  for (; b < nb; ++b) t += sp[b] * asum[b];
  return t * static_cast<float>(1 << (bits - 1));
}

// NC columns from n on. Blocks of a multiple of 8 codes that lie wholly inside K take the fast
// loop (plain 8-byte loads: the caller guarantees they stay inside B for these columns).
template <int NC, bool kFast>
__attribute__((target("avx2,fma"))) void m1_avx2_cols(const Problem& p, int64_t n, const Unpack8& u) {
  const int bits = p.s.bits;
  const int64_t bs = p.s.block_size, nb = p.nb;
  const int64_t gpb = bs / 8;
  const int64_t fast_blocks = kFast ? p.s.K / bs : 0;
  const uint8_t* q[NC];
  const float* sp[NC];
  const uint8_t* zp[NC];
  __m256 yv[NC];
  float corr[NC];
  for (int c = 0; c < NC; ++c) {
    q[c] = p.blob_ptr(n + c, 0);
    sp[c] = p.scales + ((n + c) / p.s.group) * nb;
    zp[c] = p.zp ? p.zp + ((n + c) / p.s.group) * p.zp_row : nullptr;
    yv[c] = _mm256_setzero_ps();
    corr[c] = zero_correction(p, sp[c], zp[c], u, p.asum.data());
  }
  int64_t b = 0;
  for (; b < fast_blocks; ++b) {
    __m256 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
    const float* a = p.A + b * bs;
    const int64_t off = b * p.blob;
    for (int64_t g = 0; g < gpb; ++g) {
      const __m256 av = _mm256_loadu_ps(a + 8 * g);
      for (int c = 0; c < NC; ++c) {
        const __m256i x = _mm256_set1_epi64x(*reinterpret_cast<const long long*>(q[c] + off + g * bits));
        __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(x, u.ctl), u.shv), u.mask);
        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), av, acc[c]);
      }
    }
    for (int c = 0; c < NC; ++c) yv[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(sp[c] + b), acc[c], yv[c]);
  }
  for (; b < nb; ++b) {
    const int64_t len = p.block_len(b);
    for (int c = 0; c < NC; ++c) {
      const __m256 acc = block_dot_checked(p, p.A + b * bs, q[c] + b * p.blob, len, u);
      yv[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(sp[c] + b), acc, yv[c]);
    }
  }
  for (int c = 0; c < NC; ++c) p.Y[n + c] = hsum(yv[c]) - corr[c] + (p.bias ? p.bias[n + c] : 0.f);
}

__attribute__((target("avx2,fma"))) void m1_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const Unpack8 u = make_unpack8(p.s.bits);
  // Columns before fast_end may use plain 8-byte loads anywhere in their data: such a load
  // starts at most `bits` bytes before the column's end, so it ends at most 8 - bits bytes
  // into the following columns.
  const int64_t col_bytes = p.nb * p.blob;
  const int64_t spill_cols = (8 + col_bytes - 1) / col_bytes;
  const int64_t fast_end = (p.s.block_size % 8 == 0) ? std::max<int64_t>(0, p.s.N - spill_cols) : 0;
  int64_t n = n0;
  for (; n + 4 <= std::min(n1, fast_end); n += 4) m1_avx2_cols<4, true>(p, n, u);
  for (; n < std::min(n1, fast_end); ++n) m1_avx2_cols<1, true>(p, n, u);
  for (; n < n1; ++n) m1_avx2_cols<1, false>(p, n, u);
}

__attribute__((target("avx2,fma"))) void dequant_column_avx2(const Problem& p, int64_t n, float* w, int64_t k8,
                                                            const Unpack8& u) {
  const int bits = p.s.bits;
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t len = p.block_len(b);
    const int64_t full = len / 8;
    const uint8_t* q = p.blob_ptr(n, b);
    const float sc = p.scale(n, b);
    const __m256 sv = _mm256_set1_ps(sc), ov = _mm256_set1_ps(-p.zero(n, b) * sc);
    float* out = w + b * p.s.block_size;
    for (int64_t g = 0; g < full; ++g)
      _mm256_storeu_ps(out + 8 * g, _mm256_fmadd_ps(unpack8(load_group(q + g * bits, p.B_end), u), sv, ov));
    const int rest = static_cast<int>(len - 8 * full);
    if (rest) {
      alignas(32) float t[8];
      _mm256_store_ps(t, _mm256_fmadd_ps(unpack8(load_partial(q + full * bits, rest, bits), u), sv, ov));
      for (int j = 0; j < rest; ++j) out[8 * full + j] = t[j];
    }
  }
  for (int64_t k = p.s.K; k < k8; ++k) w[k] = 0.f;
}

// C[i, j] += sum_k A[i, k] * W[j][k]; W rows are zero padded to a multiple of 8, A rows are not.
template <int MR, int NR>
__attribute__((target("avx2,fma"))) void micro_avx2(const float* A, int64_t lda, const float* const* W, int64_t k0,
                                                   int64_t k1, float* C, int64_t ldc) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t kv = k0 + ((k1 - k0) / 8) * 8;
  for (int64_t k = k0; k < kv; k += 8) {
    __m256 w[NR];
    for (int j = 0; j < NR; ++j) w[j] = _mm256_loadu_ps(W[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_loadu_ps(A + i * lda + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(a, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float t = hsum(acc[i][j]);
      for (int64_t k = kv; k < k1; ++k) t += A[i * lda + k] * W[j][k];
      C[i * ldc + j] += t;
    }
}

using MicroFn = void (*)(const float*, int64_t, const float* const*, int64_t, int64_t, float*, int64_t);
const MicroFn kMicro[4][3] = {
    {micro_avx2<1, 1>, micro_avx2<1, 2>, micro_avx2<1, 3>},
    {micro_avx2<2, 1>, micro_avx2<2, 2>, micro_avx2<2, 3>},
    {micro_avx2<3, 1>, micro_avx2<3, 2>, micro_avx2<3, 3>},
    {micro_avx2<4, 1>, micro_avx2<4, 2>, micro_avx2<4, 3>},
};

// ---- int8 activations (accuracy_level 4)
// A group of 16 codes is 2*bits bytes and starts on a byte boundary (groups start at the start of a
// blob). One 16-byte load is broadcast to both 128-bit halves; vpshufb puts the (one or two) bytes
// holding code j in 16-bit lane j, and the lane is masked to the code's bits *in place*
// (q << s_j); the activation was stored pre-shifted by 7 - s_j, so vpmaddwd yields qa * q * 128
// for every lane (pairs summed into int32: |.| <= 2 * 127 * 255 * 128, no saturation for any bits).
struct I8Unpack {
  __m256i ctl, mask;
};

__attribute__((target("avx2,fma"))) I8Unpack make_i8_unpack(int bits) {
  alignas(32) uint8_t ctl[32];
  alignas(32) uint16_t mask[16];
  for (int j = 0; j < 16; ++j) {
    const int bit = j * bits, byte = bit / 8, shift = bit % 8;
    ctl[2 * j] = static_cast<uint8_t>(byte);                                            // byte <= 2*bits - 1 <= 15
    ctl[2 * j + 1] = shift + bits > 8 ? static_cast<uint8_t>(byte + 1) : uint8_t{0x80};  // 0x80: zero
    mask[j] = static_cast<uint16_t>(((1u << bits) - 1u) << shift);
  }
  I8Unpack u;
  u.ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctl));
  u.mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(mask));
  return u;
}

// M == 1, NC (4 or 8) columns: after each block the NC int32 accumulators are reduced with
// vphaddd into the NC column sums, which are scaled by (sa_b * the columns' scales of block b,
// taken from a transposed copy) and added to the NC outputs.
template <int NC>
__attribute__((target("avx2,fma"))) inline __m256i reduce_cols(const __m256i* acc);

template <>
__attribute__((target("avx2,fma"))) inline __m256i reduce_cols<4>(const __m256i* acc) {
  const __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]), t1 = _mm256_hadd_epi32(acc[2], acc[3]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1);  // [c0..c3 | c0..c3], partial sums of each half
  return _mm256_castsi128_si256(_mm_add_epi32(_mm256_castsi256_si128(u0), _mm256_extracti128_si256(u0, 1)));
}

template <>
__attribute__((target("avx2,fma"))) inline __m256i reduce_cols<8>(const __m256i* acc) {
  const __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]), t1 = _mm256_hadd_epi32(acc[2], acc[3]);
  const __m256i t2 = _mm256_hadd_epi32(acc[4], acc[5]), t3 = _mm256_hadd_epi32(acc[6], acc[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// kG > 0: every block has exactly kG groups and kG <= qa.flush (unrolled, no flush loop).
// Columns c >= valid repeat column valid - 1 (reads stay in bounds) and are not written.
// Float arithmetic per column, in this order (the repacked kernel does exactly the same, so both
// give bit-identical results): y = 0; for each block b: for each flush chunk of the block,
// y = fma(float(int dot of the chunk), scale * sa_b, y); then y = y - (scale * zp) * asum_b.
// Y = y + bias (or + 0).
template <int NC, int kG>
__attribute__((target("avx2,fma"))) void i8_avx2_m1(const Problem& p, int64_t m, int64_t n, const uint8_t* const* col,
                                                   int valid, const I8Unpack& u) {
  const QuantA& qa = *p.qa;
  const int bits = p.s.bits;
  const int64_t nb = p.nb, blob = p.blob, step = 2 * bits;
  const int64_t gpb = kG > 0 ? kG : qa.bs16 / 16, flush = kG > 0 ? kG : qa.flush;
  const float* sp[NC];
  const uint8_t* zrow[NC];
  const uint8_t* q[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t nc = n + std::min(c, valid - 1);
    sp[c] = p.scales + (nc / p.s.group) * nb;
    zrow[c] = p.zp ? p.zp + (nc / p.s.group) * p.zp_row : nullptr;
    q[c] = col[std::min(c, valid - 1)];
  }
  thread_local std::vector<float> st_buf;  // [nb][16]: sa_b * scale, then scale * zp, of column n + c, block b
  st_buf.resize(static_cast<size_t>(nb * 16));
  float* st = st_buf.data();
  const float* sa = qa.scale.data() + m * nb;
  const float zdef = static_cast<float>(1 << (bits - 1));
  for (int64_t b = 0; b < nb; ++b)
    for (int c = 0; c < NC; ++c) {
      st[b * 16 + c] = sp[c][b] * sa[b];
      st[b * 16 + 8 + c] = sp[c][b] * (zrow[c] ? static_cast<float>(bitstream_code(zrow[c], b, bits)) : zdef);
    }
  const float* as = qa.asum.data() + m * nb;
  const int16_t* arow = qa.q.data() + m * qa.stride;
  const __m256i ctl = u.ctl, mask = u.mask;
  __m256 y = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = b * blob;
    const int16_t* a = arow + b * qa.bs16;
    for (int64_t g0 = 0; g0 < gpb; g0 += flush) {
      const int64_t g1 = std::min(gpb, g0 + flush);
      __m256i acc[NC];
      for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_si256();
      for (int64_t g = g0; g < g1; ++g) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * g));
        const int64_t o = off + g * step;
        for (int c = 0; c < NC; ++c) {
          __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[c] + o)));
          x = _mm256_and_si256(_mm256_shuffle_epi8(x, ctl), mask);
          acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(x, av));
        }
      }
      y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce_cols<NC>(acc)), _mm256_loadu_ps(st + b * 16), y);
    }
    y = _mm256_fnmadd_ps(_mm256_loadu_ps(st + b * 16 + 8), _mm256_set1_ps(as[b]), y);
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, y);
  for (int c = 0; c < valid; ++c) p.Y[m * p.s.N + n + c] = out[c] + (p.bias ? p.bias[n + c] : 0.f);
}

// Rows [m0, m1) x columns [n0, n1). Columns whose group loads could run past the end of B are
// copied, with 16 zero bytes after them, into a scratch buffer first.
__attribute__((target("avx2,fma"))) void i8_avx2(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const I8Unpack u = make_i8_unpack(p.s.bits);
  const int64_t col_bytes = p.nb * p.blob;
  const int64_t safe_end = std::max<int64_t>(0, p.s.N - (16 + col_bytes - 1) / col_bytes);
  const int64_t nc = n1 - n0;
  thread_local std::vector<const uint8_t*> cols;
  thread_local std::vector<uint8_t> scratch;
  cols.resize(static_cast<size_t>(nc));
  const int64_t unsafe = std::max<int64_t>(0, n1 - std::max(n0, safe_end));
  scratch.assign(static_cast<size_t>(unsafe * col_bytes + 16), 0);
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t n = n0 + j;
    if (n < safe_end) {
      cols[j] = p.blob_ptr(n, 0);
    } else {
      uint8_t* dst = scratch.data() + (n - std::max(n0, safe_end)) * col_bytes;
      std::memcpy(dst, p.blob_ptr(n, 0), static_cast<size_t>(col_bytes));
      cols[j] = dst;
    }
  }
  const uint8_t* const* cp = cols.data();
  using M1Fn = void (*)(const Problem&, int64_t, int64_t, const uint8_t* const*, int, const I8Unpack&);
  const int64_t gpb = p.qa->bs16 / 16;
  // Unrolled kernels only where a block needs no flush (gpb <= qa.flush).
  const int64_t ug = gpb <= p.qa->flush ? gpb : 0;
  const M1Fn f8 = ug == 2 ? i8_avx2_m1<8, 2> : ug == 4 ? i8_avx2_m1<8, 4> : ug == 8 ? i8_avx2_m1<8, 8> : i8_avx2_m1<8, 0>;
  const M1Fn f4 = ug == 2 ? i8_avx2_m1<4, 2> : ug == 4 ? i8_avx2_m1<4, 4> : ug == 8 ? i8_avx2_m1<4, 8> : i8_avx2_m1<4, 0>;
  for (int64_t m = m0; m < m1; ++m) {  // row by row: the tile stays in L1/L2 across rows
    int64_t j = 0;
    for (; j + 8 <= nc; j += 8) f8(p, m, n0 + j, cp + j, 8, u);
    for (; j < nc; j += 4) f4(p, m, n0 + j, cp + j, static_cast<int>(std::min<int64_t>(4, nc - j)), u);
  }
}

#endif  // OXQ_X86

// ------------------------------------------------------------------------------
// Tasks

struct TaskData {
  const Problem* p;
  bool avx2;
  int64_t cols;  // columns per task
};

void m1_task(void* data, size_t task) {
  const TaskData& t = *static_cast<const TaskData*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * t.cols;
  const int64_t n1 = std::min(t.p->s.N, n0 + t.cols);
#ifdef OXQ_X86
  if (t.avx2) return m1_avx2(*t.p, n0, n1);
#endif
  m1_portable(*t.p, n0, n1);
}

void gemm_task(void* data, size_t task) {
  const TaskData& t = *static_cast<const TaskData*>(data);
  const Problem& p = *t.p;
  const int64_t M = p.s.M, K = p.s.K, N = p.s.N;
  const int64_t n0 = static_cast<int64_t>(task) * t.cols;
  const int64_t nt = std::min(N, n0 + t.cols) - n0;
  const int64_t k8 = (K + 7) / 8 * 8;
  thread_local std::vector<float> wbuf, cbuf;
  wbuf.resize(static_cast<size_t>(nt * k8));
  cbuf.assign(static_cast<size_t>(M * nt), 0.f);
#ifdef OXQ_X86
  const Unpack8 u = t.avx2 ? make_unpack8(p.s.bits) : Unpack8{};
#endif
  for (int64_t j = 0; j < nt; ++j) {
#ifdef OXQ_X86
    if (t.avx2) {
      dequant_column_avx2(p, n0 + j, wbuf.data() + j * k8, k8, u);
      continue;
    }
#endif
    dequant_column_portable(p, n0 + j, wbuf.data() + j * k8, k8);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    const int64_t k1 = std::min(K, k0 + kChunkK);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
      for (int64_t j0 = 0; j0 < nt; j0 += 3) {
        const int nr = static_cast<int>(std::min<int64_t>(3, nt - j0));
        const float* W[3];
        for (int j = 0; j < nr; ++j) W[j] = wbuf.data() + (j0 + j) * k8;
        float* C = cbuf.data() + m0 * nt + j0;
        const float* A = p.A + m0 * K;
#ifdef OXQ_X86
        if (t.avx2) {
          kMicro[mr - 1][nr - 1](A, K, W, k0, k1, C, nt);
          continue;
        }
#endif
        micro_portable(A, K, W, mr, nr, k0, k1, C, nt);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < nt; ++j)
      p.Y[m * N + n0 + j] = cbuf[m * nt + j] + (p.bias ? p.bias[n0 + j] : 0.f);
}

void i8_task(void* data, size_t task) {
  const TaskData& t = *static_cast<const TaskData*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * t.cols;
  const int64_t n1 = std::min(t.p->s.N, n0 + t.cols);
#ifdef OXQ_X86
  if (t.avx2) return i8_avx2(*t.p, 0, t.p->s.M, n0, n1);
#endif
  i8_portable(*t.p, 0, t.p->s.M, n0, n1);
}

// One activation's int8 code: round-half-even(a * inv) clipped to [-127, 127] (|v| <= 127 < 2**22).
inline int quant_round(float a, float inv) {
  float v = a * inv;
  v = (v + 12582912.f) - 12582912.f;
  v = std::min(127.f, std::max(-127.f, v));
  return static_cast<int>(v);
}

// Quantizes every row of A to int8 per block of K (see QuantA).
void quantize_activations(const Problem& p, bool shifted, QuantA& out) {
  const int64_t M = p.s.M, K = p.s.K, bs = p.s.block_size, nb = p.nb;
  const int bits = p.s.bits;
  out.bs16 = (std::min(bs, K) + 15) / 16 * 16;
  // A group of 16 codes adds at most 16 * 127 * (2**bits - 1) * 128 (shifted layout) to a column's sum.
  // Rounded down to an even count, so that the repacked kernel (groups of 32 codes) flushes at the same codes.
  out.flush = std::max<int64_t>(2, INT32_MAX / (16 * 127 * 128 * ((int64_t{1} << bits) - 1)) / 2 * 2);
  out.stride = nb * out.bs16;
  out.q.assign(static_cast<size_t>(M * out.stride), 0);
  out.scale.resize(static_cast<size_t>(M * nb));
  out.asum.resize(static_cast<size_t>(M * nb));
  int mul[16];
  for (int j = 0; j < 16; ++j) mul[j] = shifted ? 1 << (7 - (j * bits) % 8) : 1;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t len = p.block_len(b);
      const float* a = p.A + m * K + b * bs;
      float amax = 0.f;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(a[i]));
      const float sa = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int16_t* dst = out.q.data() + m * out.stride + b * out.bs16;
      int32_t isum = 0;
      for (int64_t i = 0; i < len; ++i) {
        const int qv = quant_round(a[i], inv);
        isum += qv;
        dst[i] = static_cast<int16_t>(qv * mul[i % 16]);
      }
      out.scale[m * nb + b] = shifted ? sa * (1.f / 128.f) : sa;
      out.asum[m * nb + b] = sa * static_cast<float>(isum);
    }
  }
}

}  // namespace

const char* cpu_isa() { return use_avx2() ? "avx2" : "portable"; }

void qmatmul_cpu(const QMatMulShape& s, const float* A, const uint8_t* B, const float* scales, const uint8_t* zp,
                 const float* bias, float* Y, const TaskRunner& runner) {
  if (s.M <= 0 || s.N <= 0) return;
  Problem p;
  p.s = s;
  p.nb = s.n_blocks();
  p.blob = s.blob();
  p.zp_row = s.zp_row();
  p.A = A;
  p.B = B;
  p.B_end = B + s.packed_bytes();
  p.scales = scales;
  p.zp = zp;
  p.zp_end = zp ? zp + s.zp_bytes() : nullptr;
  p.bias = bias;
  p.Y = Y;
  if (s.K == 0) {
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n) Y[m * s.N + n] = bias ? bias[n] : 0.f;
    return;
  }
  TaskData t{&p, use_avx2(), 0};
  if (s.int8_activations() && s.M <= kInt8MaxRows) {
    QuantA qa;
    quantize_activations(p, t.avx2, qa);
    p.qa = &qa;
    t.cols = kColsPerTaskI8;
    runner.run(static_cast<size_t>((s.N + t.cols - 1) / t.cols), i8_task, &t);
  } else if (s.M == 1) {
    p.asum.assign(static_cast<size_t>(p.nb), 0.f);
    for (int64_t b = 0; b < p.nb; ++b) {
      const int64_t len = p.block_len(b);
      float acc = 0.f;
      for (int64_t i = 0; i < len; ++i) acc += A[b * s.block_size + i];
      p.asum[b] = acc;
    }
    t.cols = kColsPerTaskM1;
    runner.run(static_cast<size_t>((s.N + t.cols - 1) / t.cols), m1_task, &t);
  } else {
    t.cols = kTileN;
    runner.run(static_cast<size_t>((s.N + t.cols - 1) / t.cols), gemm_task, &t);
  }
}

// ------------------------------------------------------------------------------
// Repacked weights (accuracy_level 4, bits 2..7, AVX2)
//
// Layout of `codes`: tile t (columns 8t..8t+7), block b, group g of 32 codes (k = b*block + 32g + i),
// column pair p (columns 8t+2p, 8t+2p+1), then
//   nibbles (bits <= 4), 32 bytes: byte h*16 + i = code i | code (i + 16) << 4 of column 8t+2p+h;
//   bytes (bits 5..7), 64 bytes:   byte h*16 + i = code i, byte 32 + h*16 + i = code i + 16.
// So `x & 0x0F` / `(x >> 4) & 0x0F` (or two plain loads) give the pair's codes 0..15 and 16..31 with
// one column per 128-bit half; the activations are stored as [a0..a15 | a0..a15], [a16..a31 | a16..a31]
// and vpmaddubsw (u8 codes x s8 activations, pairs <= 2*127*127: no saturation for bits <= 7) then
// vpmaddwd by 1 give int32 partial sums. Codes past K are 0 and meet zero activations.
// After a block, 3 vphaddd reduce the 4 pair accumulators to one vector holding the 8 column sums in
// the lane order kPerm; `st` / `sz` (scale, scale * zero point per tile, block and lane) are stored
// in that order, so the per-block epilogue is 1 mul + 2 fma for 8 columns.

struct RepackedB {
  QMatMulShape s;
  int64_t nb = 0, gpb = 0, tiles = 0, flush = 0;  // gpb: groups of 32 codes per block; flush: groups per int32 sum
  bool nibble = false;
  int64_t pair_bytes = 0, tile_bytes = 0;
  std::vector<uint8_t> codes;  // [tiles][tile_bytes]
  std::vector<float> st, sz;   // [tiles][nb][8]
};

void RepackedDeleter::operator()(RepackedB* p) const { delete p; }

size_t repacked_bytes(const RepackedB& w) { return w.codes.size() + (w.st.size() + w.sz.size()) * sizeof(float); }

namespace {

constexpr int kPerm[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // lane j of a reduced tile vector = column kPerm[j]
constexpr int64_t kTilesPerTask = 4;
std::atomic<uint64_t> g_repacked_runs{0};

// Groups of 32 codes per int32 sum: half of QuantA::flush (groups of 16), so that both paths
// convert the same partial sums to float.
int64_t repack_flush(int bits) {
  return std::max<int64_t>(2, INT32_MAX / (16 * 127 * 128 * ((int64_t{1} << bits) - 1)) / 2 * 2) / 2;
}

#ifdef OXQ_X86
template <bool kNib, bool kAdd16, int kG>
__attribute__((target("avx2,fma"))) void rp_tile(const RepackedB& w, int64_t t, const int8_t* arow, const float* sa,
                                                const float* as, float* out) {
  const int64_t nb = w.nb, gpb = kG > 0 ? kG : w.gpb, flush = kG > 0 ? kG : w.flush;
  const uint8_t* q = w.codes.data() + t * w.tile_bytes;
  const float* st = w.st.data() + t * nb * 8;
  const float* sz = w.sz.data() + t * nb * 8;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 y = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t g0 = 0; g0 < gpb; g0 += flush) {
      const int64_t g1 = std::min(gpb, g0 + flush);
      __m256i acc[4];
      for (int c = 0; c < 4; ++c) acc[c] = _mm256_setzero_si256();
      for (int64_t g = g0; g < g1; ++g) {
        const int8_t* a = arow + (b * gpb + g) * 64;
        const __m256i alo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
        const __m256i ahi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
        for (int c = 0; c < 4; ++c) {
          __m256i lo, hi;
          if (kNib) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
            lo = _mm256_and_si256(x, m4);
            hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
            q += 32;
          } else {
            lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
            hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
            q += 64;
          }
          const __m256i plo = _mm256_maddubs_epi16(lo, alo), phi = _mm256_maddubs_epi16(hi, ahi);
          if (kAdd16) {  // bits <= 6: 4 * 63 * 127 fits int16
            acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_add_epi16(plo, phi), ones));
          } else {
            acc[c] = _mm256_add_epi32(acc[c], _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones)));
          }
        }
      }
      const __m256i sum = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
      y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(_mm256_loadu_ps(st + b * 8), _mm256_set1_ps(sa[b])), y);
    }
    y = _mm256_fnmadd_ps(_mm256_loadu_ps(sz + b * 8), _mm256_set1_ps(as[b]), y);
  }
  y = _mm256_permutevar8x32_ps(y, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_ps(out, y);
}

using RpFn = void (*)(const RepackedB&, int64_t, const int8_t*, const float*, const float*, float*);

template <bool kNib, bool kAdd16>
RpFn pick_rp(int64_t ug) {
  return ug == 1 ? rp_tile<kNib, kAdd16, 1> : ug == 2 ? rp_tile<kNib, kAdd16, 2> : ug == 4 ? rp_tile<kNib, kAdd16, 4>
                                                                                         : rp_tile<kNib, kAdd16, 0>;
}
#endif

struct RpTask {
  const RepackedB* w;
  const int8_t* aq;  // [M][nb * gpb * 64]
  const float* sa;   // [M][nb]
  const float* as;   // [M][nb]
  const float* bias;
  float* Y;
  int64_t M;
#ifdef OXQ_X86
  RpFn fn;
#endif
};

void rp_task(void* data, size_t task) {
#ifdef OXQ_X86
  const RpTask& r = *static_cast<const RpTask*>(data);
  const RepackedB& w = *r.w;
  const int64_t N = w.s.N, astride = w.nb * w.gpb * 64;
  const int64_t t1 = std::min(w.tiles, static_cast<int64_t>(task + 1) * kTilesPerTask);
  for (int64_t t = static_cast<int64_t>(task) * kTilesPerTask; t < t1; ++t) {
    const int64_t n0 = t * 8, cnt = std::min<int64_t>(8, N - n0);
    for (int64_t m = 0; m < r.M; ++m) {
      alignas(32) float out[8];
      r.fn(w, t, r.aq + m * astride, r.sa + m * w.nb, r.as + m * w.nb, out);
      float* y = r.Y + m * N + n0;
      for (int64_t j = 0; j < cnt; ++j) y[j] = out[j] + (r.bias ? r.bias[n0 + j] : 0.f);
    }
  }
#else
  (void)data;
  (void)task;
#endif
}

}  // namespace

RepackedPtr repack_b(const QMatMulShape& s, const uint8_t* B, const float* scales, const uint8_t* zp) {
#ifdef OXQ_X86
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!cpu_ok || !s.int8_activations() || s.bits > 7 || s.bits < 2 || s.K < 1 || s.N < 1) return nullptr;
  RepackedPtr w(new RepackedB);
  w->s = s;
  const int64_t nb = s.n_blocks(), blob = s.blob(), zp_row = s.zp_row(), bs = s.block_size;
  w->nb = nb;
  w->gpb = (std::min(bs, s.K) + 31) / 32;
  w->tiles = (s.N + 7) / 8;
  w->flush = repack_flush(s.bits);
  w->nibble = s.bits <= 4;
  w->pair_bytes = w->nibble ? 32 : 64;
  w->tile_bytes = nb * w->gpb * 4 * w->pair_bytes;
  w->codes.assign(static_cast<size_t>(w->tiles * w->tile_bytes), 0);
  w->st.assign(static_cast<size_t>(w->tiles * nb * 8), 0.f);
  w->sz.assign(static_cast<size_t>(w->tiles * nb * 8), 0.f);
  int lane_of[8];
  for (int j = 0; j < 8; ++j) lane_of[kPerm[j]] = j;
  const float zdef = static_cast<float>(1 << (s.bits - 1));
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t t = n / 8;
    const int j = static_cast<int>(n % 8), pair = j / 2, h = j % 2;
    const float* sp = scales + (n / s.group) * nb;
    const uint8_t* zrow = zp ? zp + (n / s.group) * zp_row : nullptr;
    uint8_t* tile = w->codes.data() + t * w->tile_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      const size_t ti = static_cast<size_t>((t * nb + b) * 8 + lane_of[j]);
      w->st[ti] = sp[b];
      w->sz[ti] = sp[b] * (zrow ? static_cast<float>(bitstream_code(zrow, b, s.bits)) : zdef);
      const int64_t len = std::min(bs, s.K - b * bs);
      const uint8_t* q = B + (n * nb + b) * blob;
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t code = bitstream_code(q, i, s.bits);
        const int64_t g = i / 32, r = i % 32;
        uint8_t* base = tile + ((b * w->gpb + g) * 4 + pair) * w->pair_bytes;
        if (w->nibble) base[h * 16 + r % 16] |= static_cast<uint8_t>(code << (r >= 16 ? 4 : 0));
        else base[(r >= 16 ? 32 : 0) + h * 16 + r % 16] = static_cast<uint8_t>(code);
      }
    }
  }
  return w;
#else
  (void)s;
  (void)B;
  (void)scales;
  (void)zp;
  return nullptr;
#endif
}

uint64_t repacked_runs() { return g_repacked_runs.load(); }

bool qmatmul_cpu_repacked(const QMatMulShape& s, const RepackedB& w, const float* A, const float* bias, float* Y,
                          const TaskRunner& runner) {
#ifdef OXQ_X86
  if (s.M <= 0 || s.M > kInt8MaxRows || !use_avx2() || s.K != w.s.K || s.N != w.s.N) return false;
  const int64_t M = s.M, K = s.K, bs = w.s.block_size, nb = w.nb, gpb = w.gpb, astride = nb * gpb * 64;
  thread_local std::vector<int8_t> aq;
  thread_local std::vector<float> sa, as;
  aq.assign(static_cast<size_t>(M * astride), 0);
  sa.resize(static_cast<size_t>(M * nb));
  as.resize(static_cast<size_t>(M * nb));
  std::vector<int8_t> tmp(static_cast<size_t>(gpb * 32));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {  // the rounding of quantize_activations, bit for bit
      const int64_t len = std::min(bs, K - b * bs);
      const float* a = A + m * K + b * bs;
      float amax = 0.f;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(a[i]));
      const float sab = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t isum = 0;
      std::fill(tmp.begin(), tmp.end(), int8_t{0});
      for (int64_t i = 0; i < len; ++i) {
        const int qv = quant_round(a[i], inv);
        isum += qv;
        tmp[static_cast<size_t>(i)] = static_cast<int8_t>(qv);
      }
      sa[m * nb + b] = sab;
      as[m * nb + b] = sab * static_cast<float>(isum);
      int8_t* dst = aq.data() + m * astride + b * gpb * 64;
      for (int64_t g = 0; g < gpb; ++g, dst += 64) {
        const int8_t* src = tmp.data() + g * 32;
        std::memcpy(dst, src, 16);
        std::memcpy(dst + 16, src, 16);
        std::memcpy(dst + 32, src + 16, 16);
        std::memcpy(dst + 48, src + 16, 16);
      }
    }
  }
  RpTask r{&w, aq.data(), sa.data(), as.data(), bias, Y, M, nullptr};
  const int64_t ug = gpb <= w.flush && (gpb == 1 || gpb == 2 || gpb == 4) ? gpb : 0;
  r.fn = w.nibble ? pick_rp<true, true>(ug) : w.s.bits <= 6 ? pick_rp<false, true>(ug) : pick_rp<false, false>(ug);
  runner.run(static_cast<size_t>((w.tiles + kTilesPerTask - 1) / kTilesPerTask), rp_task, &r);
  g_repacked_runs.fetch_add(1);
  return true;
#else
  (void)s;
  (void)w;
  (void)A;
  (void)bias;
  (void)Y;
  (void)runner;
  return false;
#endif
}

// ------------------------------------------------------------------------------
// Half precision conversions

namespace {

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (m & 0x3FFu) << 13;
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 112u) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // result subnormal or zero: round |f| * 2**24 to an integer, ties to even
    float mag;
    std::memcpy(&mag, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(mag * 16777216.0f)));
  }
  const uint32_t mant_odd = (ax >> 13) & 1u;
  const uint32_t rounded = ax + 0xC8000FFFu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

#ifdef OXQ_X86
bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = half_bits_to_float(in[i]);
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) out[i] = float_to_half_bits(in[i]);
}
#endif

}  // namespace

void half_to_float(const uint16_t* in, float* out, size_t n) {
#ifdef OXQ_X86
  if (has_f16c()) return half_to_float_f16c(in, out, n);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = half_bits_to_float(in[i]);
}

void float_to_half(const float* in, uint16_t* out, size_t n) {
#ifdef OXQ_X86
  if (has_f16c()) return float_to_half_f16c(in, out, n);
#endif
  for (size_t i = 0; i < n; ++i) out[i] = float_to_half_bits(in[i]);
}

}  // namespace oxq
