// CUDA kernels for ox_quant.MatMulNBits (built only into the CUDA library).
// Plain pointers, no CUDA headers: the ONNX Runtime glue is compiled by the host compiler.
#pragma once

#include "oxq/qmatmul.h"

namespace oxq {

// Launches Y = A @ dequant(B) (+ bias) on `stream` (a cudaStream_t, nullptr = default stream).
// All pointers are device pointers; element type of A/scales/bias/Y is float (half == false)
// or IEEE half (half == true). Returns a cudaError_t value (0 = success).
int qmatmul_cuda(const QMatMulShape& s, bool half, const void* A, const uint8_t* B, const void* scales,
                 const uint8_t* zp, const void* bias, void* Y, void* stream);

const char* cuda_error_name(int err);

}  // namespace oxq
