// The part of onnxruntime's C ABI that graphopt's kernels for its CPU provider use, and helpers they share
// (int4_linear.cc, decode_attention.cc; built into one library by graphopt.targets.onnx.native_kernels).
//
// No headers ship with onnxruntime's Python wheel: the OrtApi function table is indexed by slot, and
// onnxruntime only ever appends to that table.

#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" {
struct OrtStatus;
struct OrtApi;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtTensorTypeAndShapeInfo;

struct ApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};
}

namespace graphopt_ort {

constexpr uint32_t kApiVersion = 20;  // onnxruntime >= 1.20: KernelContext_ParallelFor is in the table
constexpr int kFloat = 1;              // ONNXTensorElementDataType
constexpr int kUint8 = 2;
constexpr int kInt32 = 6;
constexpr int kInt64 = 7;
constexpr int kRequired = 0;           // OrtCustomOpInputOutputCharacteristic
constexpr int kOptional = 1;

// Slots of the OrtApi table this library calls.
enum Slot : size_t {
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,
};

inline const OrtApi* g_api = nullptr;

template <typename Fn>
inline Fn slot(Slot index) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(g_api)[index]);
}

// onnxruntime's OrtCustomOp at layout version 14 (the fields it reads for that version, in order).
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
};

struct Shape {
  std::vector<int64_t> dims;
};

inline Shape shape_of(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  slot<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(value, &info);
  size_t count = 0;
  slot<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, &count);
  Shape shape;
  shape.dims.resize(count);
  slot<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, shape.dims.data(),
                                                                                            count);
  slot<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  return shape;
}

inline void* data_of(const OrtValue* value) {
  void* data = nullptr;
  slot<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(const_cast<OrtValue*>(value), &data);
  return data;
}

inline int64_t element_count(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape.dims) n *= d;
  return n;
}

// Output `index` of the running kernel, allocated with `dims` (or the buffer the caller bound to it).
inline OrtValue* kernel_output(OrtKernelContext* context, size_t index, const std::vector<int64_t>& dims) {
  OrtValue* value = nullptr;
  slot<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(kKernelContextGetOutput)(
      context, index, dims.data(), dims.size(), &value);
  return value;
}

// The OrtCustomOp entries every op of this library fills alike: CPU only, no kernel state to free, inputs and
// outputs in CPU memory, no variadic arguments.
constexpr uint32_t kCustomOpVersion = 14;
inline void destroy_kernel(void*) {}
inline const char* cpu_provider(const CustomOp*) { return "CPUExecutionProvider"; }
inline int required(const CustomOp*, size_t) { return kRequired; }
inline int default_memory(const CustomOp*, size_t) { return 0; }
inline int one(const CustomOp*) { return 1; }

// e^x for float32 lanes: 2^n * e^r with r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] and e^r to degree 7
// (truncation below 1e-8 relative, under float32's own rounding); x is first clamped to [-88, 88].
inline __m512 exp_lanes(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts, exact first
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(e, n);
}

// graphopt.DecodeAttention (decode_attention.cc), registered with the int4 kernels in one domain.
const CustomOp* decode_attention_op();

}  // namespace graphopt_ort
