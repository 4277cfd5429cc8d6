// CUDA kernels for ox_quant.MatMulNBits (see custom_ops/README.md for the op's semantics).
//  * gemv_kernel  (M <= 8): one warp per output channel; the warp's lanes stride over the
//    column's 8-code groups (all blocks flattened), so short blocks keep every lane busy;
//    each packed byte is read once and reused for all M rows; warp-shuffle reduction.
//  * tiled_kernel (M > 8): 64x64 output tiles, K in steps of 32; A and the dequantized W
//    tile are staged in shared memory; each thread computes a 4x4 micro-tile.
// Accumulation is in float for float and half inputs.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "oxq/qmatmul.h"
#include "oxq/qmatmul_cuda.h"

namespace oxq {
namespace {

struct DevShape {
  int64_t M, K, N, bs, group, nb, blob, zp_row;
  int bits;
};

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

__device__ __forceinline__ uint32_t code_at(const uint8_t* row, int64_t index, int bits) {
  return oxq::bitstream_code(row, index, bits);
}

__device__ __forceinline__ float zero_at(const DevShape& s, const uint8_t* zp, int64_t n, int64_t b) {
  if (zp == nullptr) return static_cast<float>(1 << (s.bits - 1));
  return static_cast<float>(code_at(zp + (n / s.group) * s.zp_row, b, s.bits));
}

constexpr int kGemvMaxM = 8;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void gemv_kernel(DevShape s, const T* __restrict__ A, const uint8_t* __restrict__ B, const T* __restrict__ scales,
                            const uint8_t* __restrict__ zp, const T* __restrict__ bias, T* __restrict__ Y) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (n >= s.N) return;
  const int64_t gpb = (s.bs + 7) / 8;  // 8-code groups per block
  const int64_t total = s.nb * gpb;
  const uint8_t* col = B + n * s.nb * s.blob;
  const int64_t srow = (n / s.group) * s.nb;
  float acc[kGemvMaxM];
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.f;
  for (int64_t t = lane; t < total; t += 32) {
    const int64_t b = t / gpb, g = t % gpb;
    const int64_t k0 = b * s.bs + g * 8;
    const int64_t len = min(min(static_cast<int64_t>(8), s.bs - g * 8), s.K - k0);
    if (len <= 0) continue;
    const uint8_t* q = col + b * s.blob;
    const float sc = load_f(scales, srow + b);
    const float z = zero_at(s, zp, n, b);
    float w[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = j < len ? (static_cast<float>(code_at(q, g * 8 + j, s.bits)) - z) * sc : 0.f;
#pragma unroll
    for (int m = 0; m < kGemvMaxM; ++m) {
      if (m < s.M) {
        const T* a = A + m * s.K + k0;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (j < len) acc[m] += w[j] * load_f(a, j);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0 && m < s.M) store_f(Y, m * s.N + n, v + (bias ? load_f(bias, n) : 0.f));
  }
}

constexpr int TM = 64, TN = 64, TK = 32;

template <typename T>
__global__ void __launch_bounds__(256) tiled_kernel(DevShape s, const T* __restrict__ A, const uint8_t* __restrict__ B,
                                                    const T* __restrict__ scales, const uint8_t* __restrict__ zp,
                                                    const T* __restrict__ bias, T* __restrict__ Y) {
  __shared__ float As[TK][TM + 4];
  __shared__ float Ws[TK][TN + 4];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TM, n0 = static_cast<int64_t>(blockIdx.x) * TN;
  const int tr = tid / 16, tc = tid % 16;  // this thread's 4x4 outputs: rows tr*4.., cols tc*4..
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < s.K; k0 += TK) {
    // A tile: TM x TK, 8 values per thread; consecutive threads read consecutive k.
    for (int i = tid; i < TM * TK; i += 256) {
      const int mm = i / TK, kk = i % TK;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < s.M && k < s.K) ? load_f(A, m * s.K + k) : 0.f;
    }
    // W tile: TK x TN dequantized; a thread takes 8 consecutive k of one column.
    for (int i = tid; i < TN * (TK / 8); i += 256) {
      const int nn = i / (TK / 8), kk0 = (i % (TK / 8)) * 8;
      const int64_t n = n0 + nn;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t k = k0 + kk0 + j;
        float w = 0.f;
        if (n < s.N && k < s.K) {
          const int64_t b = k / s.bs;
          const uint8_t* q = B + (n * s.nb + b) * s.blob;
          w = (static_cast<float>(code_at(q, k - b * s.bs, s.bits)) - zero_at(s, zp, n, b)) *
              load_f(scales, (n / s.group) * s.nb + b);
        }
        Ws[kk0 + j][nn] = w;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < TK; ++kk) {
      float a[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][tr * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = Ws[kk][tc * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tr * 4 + i;
    if (m >= s.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tc * 4 + j;
      if (n < s.N) store_f(Y, m * s.N + n, acc[i][j] + (bias ? load_f(bias, n) : 0.f));
    }
  }
}

template <typename T>
cudaError_t launch(const DevShape& d, const void* A, const uint8_t* B, const void* scales, const uint8_t* zp,
                   const void* bias, void* Y, cudaStream_t stream) {
  const T* a = static_cast<const T*>(A);
  const T* sc = static_cast<const T*>(scales);
  const T* bi = static_cast<const T*>(bias);
  T* y = static_cast<T*>(Y);
  if (d.M <= kGemvMaxM) {
    const dim3 grid(static_cast<unsigned>((d.N + kWarpsPerBlock - 1) / kWarpsPerBlock));
    gemv_kernel<T><<<grid, kWarpsPerBlock * 32, 0, stream>>>(d, a, B, sc, zp, bi, y);
  } else {
    const dim3 grid(static_cast<unsigned>((d.N + TN - 1) / TN), static_cast<unsigned>((d.M + TM - 1) / TM));
    tiled_kernel<T><<<grid, 256, 0, stream>>>(d, a, B, sc, zp, bi, y);
  }
  return cudaGetLastError();
}

DevShape to_dev(const QMatMulShape& s) {
  return DevShape{s.M, s.K, s.N, s.block_size, s.group, s.n_blocks(), s.blob(), s.zp_row(), s.bits};
}

}  // namespace

int qmatmul_cuda(const QMatMulShape& s, bool half, const void* A, const uint8_t* B, const void* scales, const uint8_t* zp,
                 const void* bias, void* Y, void* stream) {
  if (s.M == 0 || s.N == 0) return 0;
  if (s.M > 65535LL * TM) return static_cast<int>(cudaErrorInvalidConfiguration);
  const DevShape d = to_dev(s);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return static_cast<int>(half ? launch<__half>(d, A, B, scales, zp, bias, Y, st) : launch<float>(d, A, B, scales, zp, bias, Y, st));
}

const char* cuda_error_name(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace oxq

// ---------------------------------------------------------------------------------------
// Host-buffer entry points for tools/check_cuda_ops.py (no ONNX Runtime needed).

extern "C" __attribute__((visibility("default"))) int OxQuantOpsCudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// Copies the host buffers to the device, runs the kernel on a fresh stream, copies Y back.
// half != 0: A, scales, bias and Y hold IEEE half values (uint16). Returns 0 on success,
// otherwise a cudaError_t value; err (errlen bytes) receives its text.
extern "C" __attribute__((visibility("default"))) int OxQuantOpsCudaMatMulHost(
    int64_t M, int64_t K, int64_t N, int bits, int64_t block_size, int64_t group, int half, const void* A,
    const uint8_t* B, const void* scales, const uint8_t* zp, const void* bias, void* Y, char* err, int errlen) {
  const oxq::QMatMulShape s(M, K, N, bits, block_size, group);
  const size_t es = half ? 2 : 4;
  void *dA = nullptr, *dS = nullptr, *dBias = nullptr, *dY = nullptr;
  uint8_t *dB = nullptr, *dZ = nullptr;
  cudaStream_t stream = nullptr;
  cudaError_t e = cudaSuccess;
  auto step = [&](cudaError_t r) {
    if (e == cudaSuccess) e = r;
    return e == cudaSuccess;
  };
  if (step(cudaStreamCreate(&stream)) && step(cudaMalloc(&dA, es * M * K)) && step(cudaMalloc(&dB, s.packed_bytes())) &&
      step(cudaMalloc(&dS, es * s.n_scales())) && step(cudaMalloc(&dY, es * M * N)) &&
      (!zp || step(cudaMalloc(&dZ, s.zp_bytes()))) && (!bias || step(cudaMalloc(&dBias, es * N))) &&
      step(cudaMemcpy(dA, A, es * M * K, cudaMemcpyHostToDevice)) &&
      step(cudaMemcpy(dB, B, s.packed_bytes(), cudaMemcpyHostToDevice)) &&
      step(cudaMemcpy(dS, scales, es * s.n_scales(), cudaMemcpyHostToDevice)) &&
      (!zp || step(cudaMemcpy(dZ, zp, s.zp_bytes(), cudaMemcpyHostToDevice))) &&
      (!bias || step(cudaMemcpy(dBias, bias, es * N, cudaMemcpyHostToDevice)))) {
    if (step(static_cast<cudaError_t>(oxq::qmatmul_cuda(s, half != 0, dA, dB, dS, dZ, dBias, dY, stream))) &&
        step(cudaStreamSynchronize(stream)))
      step(cudaMemcpy(Y, dY, es * M * N, cudaMemcpyDeviceToHost));
  }
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dS);
  cudaFree(dY);
  cudaFree(dZ);
  cudaFree(dBias);
  if (stream) cudaStreamDestroy(stream);
  if (e != cudaSuccess && err && errlen > 0) {
    std::strncpy(err, cudaGetErrorString(e), static_cast<size_t>(errlen) - 1);
    err[errlen - 1] = '\0';
  }
  return static_cast<int>(e);
}
