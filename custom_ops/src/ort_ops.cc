// ONNX Runtime glue for ox_quant.MatMulNBits: kernel registration, attribute and shape
// checks, dtype handling. Built twice: CPU kernels only (libox_quant_ops.so) and
// CPU + CUDA kernels (libox_quant_ops_cuda.so, OXQ_WITH_CUDA defined).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "oxq/qmatmul.h"
#ifdef OXQ_WITH_CUDA
#include "oxq/qmatmul_cuda.h"
#endif

namespace {

std::atomic<unsigned long long> g_unknown_dims{0};  // fresh names for unknown dims (shape inference)

constexpr const char* kDomain = "ox_quant";
constexpr const char* kOpName = "MatMulNBits";

// Input positions, as com.microsoft.MatMulNBits.
enum Input : size_t { kA = 0, kB = 1, kScales = 2, kZeroPoints = 3, kGIdx = 4, kBias = 5, kInputCount = 6 };

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t required_int(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v)) {
    api.ReleaseStatus(st);
    throw OpError(std::string("ox_quant.MatMulNBits: missing int attribute '") + name + "'");
  }
  return v;
}

int64_t optional_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t v = 0;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v)) {
    api.ReleaseStatus(st);
    return fallback;
  }
  return v;
}

oxq::QMatMulShape read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
  oxq::QMatMulShape s;
  s.K = required_int(api, info, "K");
  s.N = required_int(api, info, "N");
  const int64_t bits = required_int(api, info, "bits");
  s.block_size = required_int(api, info, "block_size");
  s.group = optional_int(api, info, "channel_group_size", 1);
  const int64_t level = optional_int(api, info, "accuracy_level", 0);
  if (level < 0 || level > 4)
    throw OpError("ox_quant.MatMulNBits: accuracy_level must be in 0..4, got " + std::to_string(level));
  s.accuracy_level = static_cast<int>(level);
  if (bits < 2 || bits > 8) throw OpError("ox_quant.MatMulNBits: bits must be in 2..8, got " + std::to_string(bits));
  s.bits = static_cast<int>(bits);
  if (s.K < 1 || s.N < 1) throw OpError("ox_quant.MatMulNBits: K and N must be >= 1");
  if (s.block_size < 1) throw OpError("ox_quant.MatMulNBits: block_size must be >= 1");
  if (s.group < 1) throw OpError("ox_quant.MatMulNBits: channel_group_size must be >= 1");
  return s;
}

int64_t element_count(const Ort::ConstValue& v) { return static_cast<int64_t>(v.GetTensorTypeAndShapeInfo().GetElementCount()); }

// An optional input, or a null value when the node leaves it out (or passes an empty tensor name).
Ort::ConstValue optional_input(Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return Ort::ConstValue{nullptr};
  return ctx.GetInput(index);
}

struct Checked {
  oxq::QMatMulShape s;
  std::vector<int64_t> out_shape;
  Ort::ConstValue A{nullptr}, B{nullptr}, scales{nullptr}, zp{nullptr}, bias{nullptr};
};

std::string dims(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

// Shape checks shared by the CPU and CUDA kernels.
Checked check_inputs(Ort::KernelContext& ctx, const oxq::QMatMulShape& attrs) {
  Checked c;
  c.s = attrs;
  c.A = ctx.GetInput(kA);
  c.B = ctx.GetInput(kB);
  c.scales = ctx.GetInput(kScales);
  c.zp = optional_input(ctx, kZeroPoints);
  c.bias = optional_input(ctx, kBias);
  if (Ort::ConstValue g = optional_input(ctx, kGIdx); g && element_count(g) > 0)
    throw OpError("ox_quant.MatMulNBits: g_idx (input 4) is not supported; leave it empty");
  const std::vector<int64_t> a_shape = c.A.GetTensorTypeAndShapeInfo().GetShape();
  if (a_shape.empty() || a_shape.back() != attrs.K)
    throw OpError("ox_quant.MatMulNBits: A has shape " + dims(a_shape) + ", its last dimension must be K=" +
                  std::to_string(attrs.K));
  int64_t m = 1;
  for (size_t i = 0; i + 1 < a_shape.size(); ++i) m *= a_shape[i];
  c.s.M = m;
  c.out_shape = a_shape;
  c.out_shape.back() = attrs.N;
  if (element_count(c.B) != attrs.packed_bytes())
    throw OpError("ox_quant.MatMulNBits: B has " + std::to_string(element_count(c.B)) + " bytes, expected N*n_blocks*blob = " +
                  std::to_string(attrs.packed_bytes()));
  if (element_count(c.scales) != attrs.n_scales())
    throw OpError("ox_quant.MatMulNBits: scales has " + std::to_string(element_count(c.scales)) +
                  " elements, expected ceil(N/channel_group_size)*n_blocks = " + std::to_string(attrs.n_scales()));
  if (c.zp && element_count(c.zp) == 0) c.zp = Ort::ConstValue{nullptr};
  if (c.zp && element_count(c.zp) != attrs.zp_bytes())
    throw OpError("ox_quant.MatMulNBits: zero_points has " + std::to_string(element_count(c.zp)) +
                  " bytes, expected ceil(N/channel_group_size)*ceil(n_blocks*bits/8) = " + std::to_string(attrs.zp_bytes()));
  if (c.bias && element_count(c.bias) == 0) c.bias = Ort::ConstValue{nullptr};
  if (c.bias && element_count(c.bias) != attrs.N)
    throw OpError("ox_quant.MatMulNBits: bias has " + std::to_string(element_count(c.bias)) + " elements, expected N=" +
                  std::to_string(attrs.N));
  return c;
}

// Runs CPU tasks on the session's intra-op thread pool.
struct OrtRunner final : oxq::TaskRunner {
  explicit OrtRunner(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void run(size_t n_tasks, void (*fn)(void*, size_t), void* data) const override {
    if (n_tasks <= 1) {
      for (size_t i = 0; i < n_tasks; ++i) fn(data, i);
      return;
    }
    ctx_.ParallelFor(fn, n_tasks, 0, data);
  }
  const Ort::KernelContext& ctx_;
};

template <typename T>
constexpr ONNXTensorElementDataType elem_type() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

std::vector<float> to_float(const Ort::ConstValue& v) {
  const size_t n = static_cast<size_t>(element_count(v));
  std::vector<float> out(n);
  oxq::half_to_float(reinterpret_cast<const uint16_t*>(v.GetTensorRawData()), out.data(), n);
  return out;
}

OrtStatusPtr to_status(const char* what) { return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, what); }

// A constant initializer feeding input `index`, or a null value (input absent, or a graph input /
// computed value that may change between runs).
Ort::ConstValue constant_input(const OrtKernelInfo* info, size_t index) {
  Ort::ConstKernelInfo ki(info);
  if (index >= ki.GetInputCount() || ki.GetInputName(index).empty()) return Ort::ConstValue{nullptr};
  int is_constant = 0;
  Ort::ConstValue v = ki.GetTensorConstantInput(index, &is_constant);
  return is_constant ? v : Ort::ConstValue{nullptr};
}

// Repacks B (with scales and zero points) for the CPU int8-activation kernel when all three are
// constant initializers of the right sizes; nullptr otherwise (Compute then reads the inputs).
template <typename T>
oxq::RepackedPtr try_repack(const OrtKernelInfo* info, const oxq::QMatMulShape& attrs) {
  if (!attrs.int8_activations() || attrs.bits > 7) return nullptr;
  Ort::ConstValue B = constant_input(info, kB), scales = constant_input(info, kScales);
  if (!B || !scales) return nullptr;
  Ort::ConstKernelInfo ki(info);
  Ort::ConstValue zp{nullptr};
  const bool zp_given = kZeroPoints < ki.GetInputCount() && !ki.GetInputName(kZeroPoints).empty();
  if (zp_given) {
    zp = constant_input(info, kZeroPoints);
    if (!zp) return nullptr;
    if (element_count(zp) == 0) zp = Ort::ConstValue{nullptr};
  }
  if (element_count(B) != attrs.packed_bytes() || element_count(scales) != attrs.n_scales() ||
      (zp && element_count(zp) != attrs.zp_bytes()))
    return nullptr;  // Compute reports the size error
  const uint8_t* zptr = zp ? zp.GetTensorData<uint8_t>() : nullptr;
  if constexpr (std::is_same<T, float>::value) {
    return oxq::repack_b(attrs, B.GetTensorData<uint8_t>(), scales.GetTensorData<float>(), zptr);
  } else {
    const std::vector<float> sc = to_float(scales);
    return oxq::repack_b(attrs, B.GetTensorData<uint8_t>(), sc.data(), zptr);
  }
}

template <typename T, bool kCuda>
struct QMatMulKernel {
  oxq::QMatMulShape attrs;
  oxq::RepackedPtr packed;  // CPU, accuracy_level 4, constant weights: see oxq::repack_b

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      Checked c = check_inputs(ctx, attrs);
      Ort::UnownedValue y = ctx.GetOutput(0, c.out_shape);
      if (c.s.M == 0) return nullptr;
      const uint8_t* zp = c.zp ? c.zp.GetTensorData<uint8_t>() : nullptr;
      if constexpr (kCuda) {
#ifdef OXQ_WITH_CUDA
        const int err = oxq::qmatmul_cuda(c.s, !std::is_same<T, float>::value, c.A.GetTensorRawData(),
                                          c.B.GetTensorData<uint8_t>(), c.scales.GetTensorRawData(), zp,
                                          c.bias ? c.bias.GetTensorRawData() : nullptr, y.GetTensorMutableRawData(),
                                          ctx.GetGPUComputeStream());
        if (err != 0) throw OpError(std::string("ox_quant.MatMulNBits CUDA kernel failed: ") + oxq::cuda_error_name(err));
#endif
      } else if constexpr (std::is_same<T, float>::value) {
        if (packed && oxq::qmatmul_cpu_repacked(c.s, *packed, c.A.GetTensorData<float>(),
                                                c.bias ? c.bias.GetTensorData<float>() : nullptr,
                                                y.GetTensorMutableData<float>(), OrtRunner(ctx)))
          return nullptr;
        oxq::qmatmul_cpu(c.s, c.A.GetTensorData<float>(), c.B.GetTensorData<uint8_t>(), c.scales.GetTensorData<float>(),
                         zp, c.bias ? c.bias.GetTensorData<float>() : nullptr, y.GetTensorMutableData<float>(),
                         OrtRunner(ctx));
      } else {
        const std::vector<float> a = to_float(c.A), sc = to_float(c.scales);
        std::vector<float> bias;
        if (c.bias) bias = to_float(c.bias);
        std::vector<float> out(static_cast<size_t>(c.s.M * c.s.N));
        if (!(packed && oxq::qmatmul_cpu_repacked(c.s, *packed, a.data(), c.bias ? bias.data() : nullptr, out.data(),
                                                  OrtRunner(ctx))))
          oxq::qmatmul_cpu(c.s, a.data(), c.B.GetTensorData<uint8_t>(), sc.data(), zp, c.bias ? bias.data() : nullptr,
                         out.data(), OrtRunner(ctx));
        oxq::float_to_half(out.data(), reinterpret_cast<uint16_t*>(y.GetTensorMutableRawData()), out.size());
      }
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(e.what());
    }
  }
};

template <typename T, bool kCuda>
struct QMatMulOp : Ort::CustomOpBase<QMatMulOp<T, kCuda>, QMatMulKernel<T, kCuda>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      auto k = std::make_unique<QMatMulKernel<T, kCuda>>();
      k->attrs = read_attributes(api, info);
      if (!kCuda) k->packed = try_repack<T>(info, k->attrs);
      *kernel = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputCount; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case kB:
      case kZeroPoints:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case kGIdx:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default:
        return elem_type<T>();
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index <= kScales ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
                            : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return elem_type<T>(); }

  // Y's shape: A's shape with the last dimension replaced by N.
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    try {
      Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(kA);
      if (shape.empty()) return to_status("ox_quant.MatMulNBits: A must have rank >= 1");
      // An unknown, unnamed dimension of A arrives as the integer -1. Written back as is,
      // it becomes a *known* -1 that ORT propagates through Shape/Gather/Concat into a
      // Reshape target ("multiple -1 dimensions"). Give each one a fresh symbolic name.
      std::vector<std::string> names;
      names.reserve(shape.size());
      for (const auto& dim : shape) {
        names.push_back(dim.IsInt() && dim.AsInt() < 0 ? "ox_quant_unk_" + std::to_string(g_unknown_dims++) : "");
      }
      for (size_t i = 0; i < shape.size(); ++i) {
        if (!names[i].empty()) shape[i] = Ort::ShapeInferContext::SymbolicInteger(names[i].c_str());
      }
      shape.back() = Ort::ShapeInferContext::SymbolicInteger(ctx.GetAttrInt("N"));
      ctx.SetOutputShape(0, shape);
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(e.what());
    }
  }
};

std::mutex g_mutex;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> g_domains;  // must outlive every session using them

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                           const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    return v1->CreateStatus(ORT_FAIL, "ox_quant custom ops need ONNX Runtime >= 1.21 (C API version 21)");
  }
  Ort::InitApi(api);
  static QMatMulOp<float, false> cpu_f32;
  static QMatMulOp<Ort::Float16_t, false> cpu_f16;
#ifdef OXQ_WITH_CUDA
  static QMatMulOp<float, true> cuda_f32;
  static QMatMulOp<Ort::Float16_t, true> cuda_f16;
#endif
  try {
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(&cpu_f32);
    domain->Add(&cpu_f16);
#ifdef OXQ_WITH_CUDA
    domain->Add(&cuda_f32);
    domain->Add(&cuda_f16);
#endif
    Ort::UnownedSessionOptions(options).Add(static_cast<OrtCustomOpDomain*>(*domain));
    std::lock_guard<std::mutex> lock(g_mutex);
    g_domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// Which CPU code path the kernels take on this machine ("avx2" or "portable").
extern "C" __attribute__((visibility("default"))) const char* OxQuantOpsCpuIsa() { return oxq::cpu_isa(); }

// How many kernel calls so far took the repacked-weights path (tests read it through ctypes).
extern "C" __attribute__((visibility("default"))) uint64_t OxQuantOpsRepackedRuns() { return oxq::repacked_runs(); }

// Runs the CPU kernel directly on host buffers (float32), serially: used by tests and tools
// that want the kernel without an ONNX Runtime session. Returns 0 on success.
// accuracy_level as the node attribute (4 = int8 activations, 0..3 = float32).
extern "C" __attribute__((visibility("default"))) int OxQuantOpsCpuMatMulAcc(int64_t M, int64_t K, int64_t N, int bits,
                                                                            int64_t block_size, int64_t group,
                                                                            int accuracy_level, const float* A,
                                                                            const uint8_t* B, const float* scales,
                                                                            const uint8_t* zp, const float* bias,
                                                                            float* Y) {
  if (bits < 2 || bits > 8 || K < 1 || N < 1 || M < 0 || block_size < 1 || group < 1 || accuracy_level < 0 ||
      accuracy_level > 4)
    return 1;
  const oxq::QMatMulShape s(M, K, N, bits, block_size, group, accuracy_level);
  oxq::qmatmul_cpu(s, A, B, scales, zp, bias, Y, oxq::SerialRunner());
  return 0;
}

// The same with accuracy_level 0 (float32 arithmetic).
extern "C" __attribute__((visibility("default"))) int OxQuantOpsCpuMatMul(int64_t M, int64_t K, int64_t N, int bits,
                                                                         int64_t block_size, int64_t group,
                                                                         const float* A, const uint8_t* B,
                                                                         const float* scales, const uint8_t* zp,
                                                                         const float* bias, float* Y) {
  return OxQuantOpsCpuMatMulAcc(M, K, N, bits, block_size, group, 0, A, B, scales, zp, bias, Y);
}
