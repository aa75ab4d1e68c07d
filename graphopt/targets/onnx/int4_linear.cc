// graphopt's exact int4 and int8 linears for onnxruntime's CPU provider (custom ops "graphopt.Int4Linear",
// "graphopt.Int8Linear").
//
// Y[m, n] = sum_k A[m, k] * (q[n, k] * scale[n, g(k)] + offset[n, g(k)]), groups g of 32 features,
// computed in float32 from float32 activations: the same product as MatMulNBits at accuracy level 0,
// but from the 4-bit codes directly, where MatMulNBits first dequantizes them into a float buffer.
//
// Int4Linear inputs: A float [..., K]; codes uint8 [N, K/32, 16] (byte i of group g: feature 32g+i in
//          the low nibble, 32g+16+i in the high one); scales float [N, K/32]; offsets float [N, K/32].
// Int8Linear inputs: A float [..., K]; codes int8 [N, K/32, 32]; scales float [N, K/32] (no offsets:
//          Y[m, n] = sum_k A[m, k] * q[n, k] * scale[n, g(k)]).
// Output:  Y float [..., N].
//
// The library talks to onnxruntime through its C ABI only (no headers ship with the Python wheel):
// the OrtApi function table is indexed by slot, and onnxruntime only ever appends to that table.
// Built by graphopt.targets.onnx.native_kernels with AVX-512 (F, BW) enabled.

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <limits>
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

namespace {

constexpr uint32_t kApiVersion = 20;  // onnxruntime >= 1.20: KernelContext_ParallelFor is in the table
constexpr int kFloat = 1;              // ONNXTensorElementDataType
constexpr int kUint8 = 2;
constexpr int kInt8 = 3;
constexpr int kRequired = 0;           // OrtCustomOpInputOutputCharacteristic
constexpr int64_t kGroup = 32;
constexpr int64_t kTasks = 8;  // per call, for onnxruntime's intra-op threads (a few cores at most here)

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

const OrtApi* g_api = nullptr;

template <typename Fn>
Fn slot(Slot index) {
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

Shape shape_of(const OrtValue* value) {
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

void* data_of(const OrtValue* value) {
  void* data = nullptr;
  slot<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(const_cast<OrtValue*>(value), &data);
  return data;
}

struct Problem {
  const float* a;       // [M, K]
  const uint8_t* codes; // [N, G, 16] (int4) or [N, G, 32] (int8)
  const float* scales;  // [N, G]
  const float* offsets; // [N, G]; int4 only
  const float* sums;    // [M, G]: each group of A's features summed
  float* y;             // [M, N]
  int64_t m, k, n, g;
  int64_t rows_per_task;
};

// Rows [row, row + R) of W against rows [first, first + MB) of A.
template <bool Int8, int R, int MB>
void block(const Problem& p, int64_t row, int64_t first) {
  const __m512i low_nibble = _mm512_set1_epi32(0x0F);
  __m512 acc[MB][R];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t group = 0; group < p.g; ++group) {
    __m512 x_low[MB], x_high[MB];
    for (int i = 0; i < MB; ++i) {
      const float* x = p.a + (first + i) * p.k + group * kGroup;
      x_low[i] = _mm512_loadu_ps(x);
      x_high[i] = _mm512_loadu_ps(x + 16);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row + r) * p.g + group;
      __m512 low, high;  // the group's first and last 16 weights (codes, before the scale)
      if constexpr (Int8) {
        const __m128i* codes = reinterpret_cast<const __m128i*>(p.codes + at * 32);
        low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes)));
        high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes + 1)));
      } else {
        const __m128i* codes = reinterpret_cast<const __m128i*>(p.codes + at * 16);
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes));
        low = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_nibble));
        high = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      }
      const __m512 scale = _mm512_set1_ps(p.scales[at]);
      for (int i = 0; i < MB; ++i) {
        const __m512 dot = _mm512_fmadd_ps(high, x_high[i], _mm512_mul_ps(low, x_low[i]));
        acc[i][r] = _mm512_fmadd_ps(dot, scale, acc[i][r]);
      }
    }
  }
  const __mmask16 all = 0xFFFF;
  for (int r = 0; r < R; ++r) {
    const float* offsets = Int8 ? nullptr : p.offsets + (row + r) * p.g;
    for (int i = 0; i < MB; ++i) {
      const float* sums = p.sums + (first + i) * p.g;
      __m512 total = acc[i][r];  // plus sum over groups of offset * (the group's features summed)
      for (int64_t group = 0; !Int8 && group < p.g; group += 16) {
        const int64_t left = p.g - group;
        const __mmask16 mask = left >= 16 ? all : static_cast<__mmask16>((1u << left) - 1);
        total = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, offsets + group), _mm512_maskz_loadu_ps(mask, sums + group),
                                total);
      }
      p.y[(first + i) * p.n + row + r] = _mm512_reduce_add_ps(total);
    }
  }
}

template <bool Int8, int R>
void rows(const Problem& p, int64_t row) {
  int64_t first = 0;
  for (; first + 4 <= p.m; first += 4) block<Int8, R, 4>(p, row, first);
  switch (p.m - first) {
    case 3: block<Int8, R, 3>(p, row, first); break;
    case 2: block<Int8, R, 2>(p, row, first); break;
    case 1: block<Int8, R, 1>(p, row, first); break;
    default: break;
  }
}

template <bool Int8>
void task(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t begin = static_cast<int64_t>(index) * p.rows_per_task;
  const int64_t end = begin + p.rows_per_task < p.n ? begin + p.rows_per_task : p.n;
  int64_t row = begin;
  for (; row + 4 <= end; row += 4) rows<Int8, 4>(p, row);
  for (; row < end; ++row) rows<Int8, 1>(p, row);
}

// The kernel handle onnxruntime passes back to compute: which op it is.
struct Kernel {
  bool int8;
};
Kernel g_int4_kernel{false};
Kernel g_int8_kernel{true};

void compute(void* kernel, OrtKernelContext* context) {
  const bool int8 = static_cast<const Kernel*>(kernel)->int8;
  const OrtValue* inputs[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < (int8 ? 3u : 4u); ++i) {
    slot<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(context, i,
                                                                                                     &inputs[i]);
  }
  Shape a_shape = shape_of(inputs[0]);
  Shape code_shape = shape_of(inputs[1]);
  Problem p{};
  p.k = a_shape.dims.back();
  p.n = code_shape.dims[0];
  p.g = code_shape.dims[1];
  p.m = 1;
  for (size_t i = 0; i + 1 < a_shape.dims.size(); ++i) p.m *= a_shape.dims[i];
  std::vector<int64_t> out_dims = a_shape.dims;
  out_dims.back() = p.n;
  OrtValue* output = nullptr;
  slot<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(kKernelContextGetOutput)(
      context, 0, out_dims.data(), out_dims.size(), &output);
  p.a = static_cast<const float*>(data_of(inputs[0]));
  p.codes = static_cast<const uint8_t*>(data_of(inputs[1]));
  p.scales = static_cast<const float*>(data_of(inputs[2]));
  p.offsets = int8 ? nullptr : static_cast<const float*>(data_of(inputs[3]));
  p.y = static_cast<float*>(data_of(output));
  if (p.m == 0 || p.n == 0) return;
  if (p.k != p.g * kGroup) {  // not what graphopt wrote: NaN, which every check downstream reports
    for (int64_t i = 0; i < p.m * p.n; ++i) p.y[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  std::vector<float> sums(static_cast<size_t>(p.m * p.g));
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t group = 0; group < p.g; ++group) {
      const float* x = p.a + i * p.k + group * kGroup;
      sums[i * p.g + group] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)));
    }
  }
  p.sums = sums.data();
  p.rows_per_task = ((p.n + kTasks - 1) / kTasks + 3) / 4 * 4;  // whole blocks of 4 rows
  const size_t tasks = static_cast<size_t>((p.n + p.rows_per_task - 1) / p.rows_per_task);
  slot<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
      kKernelContextParallelFor)(context, int8 ? task<true> : task<false>, tasks, 0, &p);
}

void* create_int4_kernel(const CustomOp*, const OrtApi*, const OrtKernelInfo*) { return &g_int4_kernel; }
void* create_int8_kernel(const CustomOp*, const OrtApi*, const OrtKernelInfo*) { return &g_int8_kernel; }
void destroy_kernel(void*) {}
const char* int4_name(const CustomOp*) { return "Int4Linear"; }
const char* int8_name(const CustomOp*) { return "Int8Linear"; }
const char* provider(const CustomOp*) { return "CPUExecutionProvider"; }
int int4_input_type(const CustomOp*, size_t index) { return index == 1 ? kUint8 : kFloat; }
int int8_input_type(const CustomOp*, size_t index) { return index == 1 ? kInt8 : kFloat; }
size_t int4_input_count(const CustomOp*) { return 4; }
size_t int8_input_count(const CustomOp*) { return 3; }
int output_type(const CustomOp*, size_t) { return kFloat; }
size_t output_count(const CustomOp*) { return 1; }
int required(const CustomOp*, size_t) { return kRequired; }
int default_memory(const CustomOp*, size_t) { return 0; }
int one(const CustomOp*) { return 1; }

CustomOp g_int4_linear = {14,       create_int4_kernel, int4_name,      provider, int4_input_type, int4_input_count,
                          output_type, output_count,   compute,        destroy_kernel,  required, required,
                          default_memory, one, one, one, one};
CustomOp g_int8_linear = {14,       create_int8_kernel, int8_name,      provider, int8_input_type, int8_input_count,
                          output_type, output_count,   compute,        destroy_kernel,  required, required,
                          default_memory, one, one, one, one};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                             const ApiBase* base) {
  g_api = base->GetApi(kApiVersion);
  if (g_api == nullptr) return nullptr;  // an older onnxruntime: graphopt checks the version before loading
  OrtCustomOpDomain* domain = nullptr;  // onnxruntime needs it to outlive the session: never released
  OrtStatus* status =
      slot<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)("graphopt", &domain);
  if (status != nullptr) return status;
  for (const CustomOp* op : {&g_int4_linear, &g_int8_linear}) {
    status = slot<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, op);
    if (status != nullptr) return status;
  }
  return slot<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
}
