// graphopt's int4 and int8 linears for onnxruntime's CPU provider (custom ops "graphopt.Int4Linear",
// "graphopt.Int8Linear", the gated "graphopt.Int4SwiGLU", "graphopt.Int8SwiGLU", and each with a skip-add
// and RMS norm before it, "graphopt.SkipNorm...").
//
// Y[m, n] = sum_k A[m, k] * (q[n, k] * scale[n, g(k)] + offset[n, g(k)]), groups g of 32 features.
//
// The products run on integers with AVX512-VNNI (vpdpbusd: 64 byte products per instruction), at
// the speed memory delivers the codes: each group of 32 activations becomes 16-bit codes,
// x ~= step * (256 * high + low) with step = the group's largest |x| / 32512, and the weight codes
// meet the high and the low bytes in two integer dot products; the offsets meet the groups' float32
// sums. Two roundings part this from the float product: the activations' to 16 bits, at most
// step / 2 each (about 2^-16 of the group's largest activation; MatMulNBits at accuracy level 4
// rounds them to 8 bits), and the scales' and offsets' to float16 (2^-11 relative; graphopt's Python
// side checks that they fit), which makes a 4-bit weight cost 0.625 bytes. Both lie far below the
// weights' own 4-bit rounding.
//
// Weights come in tiles of 16 output features (the last tile padded with zeros), one block of bytes
// per tile and group, read front to back:
//   Int4Linear inputs: A float [..., K]; weights uint8 [T, G, 320]; N int64 [1]. A block is the codes
//     [4 chunks, 16 lanes, 4 bytes] (byte b of lane c in chunk j holds q[16t + c, 32g + 8j + b] in its
//     low nibble and q[16t + c, 32g + 8j + 4 + b] in its high one), then 16 float16 scales and 16
//     float16 offsets.
//   Int8Linear inputs: A float [..., K]; weights uint8 [T, G, 544]; N int64 [1]. A block is the codes
//     [8 chunks, 16 lanes, 4 bytes] (byte b of lane c in chunk j holds q[16t + c, 32g + 4j + b] + 128),
//     then 16 float16 scales (no offsets: Y[m, n] = sum_k A[m, k] * q[n, k] * scale[n, g(k)]).
// Output:  Y float [..., N]. T = ceil(N / 16), G = K / 32.
//   Int4SwiGLU / Int8SwiGLU (a decoder MLP's SiLU(x W_gate) * (x W_up) as one op): the same inputs with
//     weights [2T, G, bytes], the gate's tile t at 2t and the up projection's at 2t + 1; each output
//     tile is SiLU(gate) * up, computed in registers before the store (e^x to float32 precision).
//   SkipNorm* (SkipNormInt4Linear, SkipNormInt8Linear, SkipNormInt4SwiGLU, SkipNormInt8SwiGLU): onnxruntime's
//     SkipSimplifiedLayerNormalization before the op, in the same call. Inputs A, weights, N, then skip
//     (A's shape), gamma [K] and epsilon float [1]; outputs Y and the sum A + skip (the next residual).
//     The op reads RMSNorm(A + skip) * gamma (mean of squares in double) in place of A.
//
// The library talks to onnxruntime through its C ABI only (ort_custom_op.h). It also holds
// graphopt.DecodeAttention (decode_attention.cc): this file's RegisterCustomOps registers both.
// Built by graphopt.targets.onnx.native_kernels with AVX-512 (F, BW, VNNI) enabled.

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "ort_custom_op.h"

namespace graphopt_ort {
namespace {

constexpr int64_t kGroup = 32;
constexpr float kCodeMax = 32512.0f;  // 16-bit activation codes stay in [-127 * 256 - 128, 127 * 256 + 127]
constexpr int64_t kTasks = 8;  // per call, for onnxruntime's intra-op threads (a few cores at most here)

// One call's activations as 16-bit codes per group of 32 features: x ~= step * (256 * high + low).
struct Activations {
  std::vector<int8_t> high, low;  // [M, K]: high in [-127, 127], low in [-128, 127]
  std::vector<float> steps;       // [M, G]: the group's largest |x| / kCodeMax (0 for an all-zero group)
  std::vector<float> sums;        // [M, G]: the group's features summed in float32 (for the int4 offsets)
  std::vector<int32_t> code_sums; // [M, G]: the group's 16-bit codes summed (for int8's +128 shift)
};

void quantize(const float* a, int64_t m, int64_t k, Activations& out) {
  const int64_t g = k / kGroup;
  out.high.resize(static_cast<size_t>(m * k));
  out.low.resize(static_cast<size_t>(m * k));
  out.steps.resize(static_cast<size_t>(m * g));
  out.sums.resize(static_cast<size_t>(m * g));
  out.code_sums.resize(static_cast<size_t>(m * g));
  for (int64_t i = 0; i < m * g; ++i) {
    const float* x = a + i * kGroup;  // rows are whole groups: group i of the flattened [M, K]
    const __m512 first = _mm512_loadu_ps(x), second = _mm512_loadu_ps(x + 16);
    const float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
    out.sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
    const bool finite = std::isfinite(out.sums[i]);  // a NaN or an infinity in the group: NaN out, as in float
    const float inverse = finite && largest > 0.0f ? kCodeMax / largest : 0.0f;
    out.steps[i] = !finite ? std::numeric_limits<float>::quiet_NaN() : largest > 0.0f ? largest / kCodeMax : 0.0f;
    __m512i code_sum = _mm512_setzero_si512();
    for (int half = 0; half < 2; ++half) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(half ? second : first, _mm512_set1_ps(inverse)));
      const __m512i low = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);  // the low byte, signed
      const __m512i high = _mm512_srai_epi32(_mm512_sub_epi32(v, low), 8);
      const int64_t at = i * kGroup + 16 * half;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.high.data() + at), _mm512_cvtepi32_epi8(high));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.low.data() + at), _mm512_cvtepi32_epi8(low));
      code_sum = _mm512_add_epi32(code_sum, v);
    }
    out.code_sums[i] = _mm512_reduce_add_epi32(code_sum);
  }
}

struct Problem {
  const Activations* x;
  const uint8_t* weights;  // [T, G, block bytes]: see the file's comment
  float* y;                // [M, N]
  int64_t m, k, n, g, tiles;
  int64_t tiles_per_task;
};

int32_t four_bytes(const int8_t* at) {
  int32_t value;
  std::memcpy(&value, at, sizeof(value));
  return value;
}

// Tile t of the weights (output features 16t .. 16t + 15 of its layer) against rows [first, first + MB)
// of the activations, summed into acc.
template <bool Int8, int MB>
void accumulate(const Problem& p, int64_t t, int64_t first, __m512 (&acc)[MB]) {
  constexpr int64_t kChunks = Int8 ? 8 : 4;  // 64-byte loads of codes per group and tile
  constexpr int64_t kBlock = kChunks * 64 + (Int8 ? 32 : 64);  // the codes, then float16 scales (and offsets)
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  const Activations& x = *p.x;
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t group = 0; group < p.g; ++group) {
    const int64_t at = t * p.g + group;
    const uint8_t* block = p.weights + at * kBlock;
    __m512i high[MB], low[MB];  // integer dot products with the high and the low activation bytes
    for (int i = 0; i < MB; ++i) high[i] = low[i] = _mm512_setzero_si512();
    for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
      const __m512i bytes = _mm512_loadu_si512(block + chunk * 64);
      if constexpr (Int8) {  // lane c: features 4 * chunk .. + 3 of output feature 16t + c, plus 128
        for (int i = 0; i < MB; ++i) {
          const int64_t from = (first + i) * p.k + group * kGroup + 4 * chunk;
          high[i] = _mm512_dpbusd_epi32(high[i], bytes, _mm512_set1_epi32(four_bytes(x.high.data() + from)));
          low[i] = _mm512_dpbusd_epi32(low[i], bytes, _mm512_set1_epi32(four_bytes(x.low.data() + from)));
        }
      } else {  // lane c: features 8 * chunk .. + 3 in the low nibbles, the next four in the high ones
        const __m512i near = _mm512_and_si512(bytes, low_nibble);
        const __m512i far = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibble);
        for (int i = 0; i < MB; ++i) {
          const int64_t from = (first + i) * p.k + group * kGroup + 8 * chunk;
          high[i] = _mm512_dpbusd_epi32(high[i], near, _mm512_set1_epi32(four_bytes(x.high.data() + from)));
          high[i] = _mm512_dpbusd_epi32(high[i], far, _mm512_set1_epi32(four_bytes(x.high.data() + from + 4)));
          low[i] = _mm512_dpbusd_epi32(low[i], near, _mm512_set1_epi32(four_bytes(x.low.data() + from)));
          low[i] = _mm512_dpbusd_epi32(low[i], far, _mm512_set1_epi32(four_bytes(x.low.data() + from + 4)));
        }
      }
    }
    const __m256i* halves = reinterpret_cast<const __m256i*>(block + kChunks * 64);  // scales, then offsets
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(halves));
    const __m512 offset = Int8 ? scale : _mm512_cvtph_ps(_mm256_loadu_si256(halves + 1));
    for (int i = 0; i < MB; ++i) {
      const int64_t row_group = (first + i) * p.g + group;
      __m512i total = _mm512_add_epi32(_mm512_slli_epi32(high[i], 8), low[i]);
      if constexpr (Int8) total = _mm512_sub_epi32(total, _mm512_set1_epi32(128 * x.code_sums[row_group]));
      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(x.steps[row_group]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), step, acc[i]);
      if constexpr (!Int8) {
        acc[i] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x.sums[row_group]), acc[i]);
      }
    }
  }
}

// SiLU(gate) * up = gate / (1 + e^-gate) * up.
__m512 swiglu(__m512 gate, __m512 up) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(one, exp_lanes(_mm512_sub_ps(_mm512_setzero_ps(), gate)))),
                       up);
}

// Output tile t (features 16t .. 16t + 15) for rows [first, first + MB): a linear reads weight tile t;
// a gated one (SwiGLU) reads the gate's tile at 2t and the up projection's at 2t + 1.
template <bool Int8, bool Gated, int MB>
void tile(const Problem& p, int64_t t, int64_t first) {
  __m512 acc[MB];
  if constexpr (Gated) {
    __m512 up[MB];
    accumulate<Int8, MB>(p, 2 * t, first, acc);
    accumulate<Int8, MB>(p, 2 * t + 1, first, up);
    for (int i = 0; i < MB; ++i) acc[i] = swiglu(acc[i], up[i]);
  } else {
    accumulate<Int8, MB>(p, t, first, acc);
  }
  const int64_t left = p.n - 16 * t;
  const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(p.y + (first + i) * p.n + 16 * t, mask, acc[i]);
}

template <bool Int8, bool Gated>
void task(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t begin = static_cast<int64_t>(index) * p.tiles_per_task;
  const int64_t end = begin + p.tiles_per_task < p.tiles ? begin + p.tiles_per_task : p.tiles;
  for (int64_t t = begin; t < end; ++t) {
    int64_t first = 0;
    for (; first + 4 <= p.m; first += 4) tile<Int8, Gated, 4>(p, t, first);
    switch (p.m - first) {
      case 3: tile<Int8, Gated, 3>(p, t, first); break;
      case 2: tile<Int8, Gated, 2>(p, t, first); break;
      case 1: tile<Int8, Gated, 1>(p, t, first); break;
      default: break;
    }
  }
}

// What an op computes: the weights' kind, SwiGLU or not, and whether a skip-add and RMS norm come first.
struct Kernel {
  bool int8;
  bool gated;
  bool normed;
};

using Task = void (*)(void*, size_t);
constexpr Task kTasksByKind[2][2] = {{task<false, false>, task<false, true>}, {task<true, false>, task<true, true>}};

// Normed ops: sum = A + skip (written to output 1), then the rows of sum scaled by 1 / sqrt(mean(sum^2) + epsilon)
// and by gamma, as onnxruntime's SkipSimplifiedLayerNormalization does, into normed [M, K].
bool skip_rms_norm(const OrtValue* const* inputs, OrtKernelContext* context, const Shape& a_shape, int64_t m,
                   int64_t k, std::vector<float>& normed) {
  const int64_t skip_size = element_count(shape_of(inputs[3])), gamma_size = element_count(shape_of(inputs[4]));
  const int64_t epsilon_size = element_count(shape_of(inputs[5]));
  float* sum = static_cast<float*>(data_of(kernel_output(context, 1, a_shape.dims)));
  if (skip_size != m * k || gamma_size != k || epsilon_size != 1) {
    for (int64_t i = 0; i < m * k; ++i) sum[i] = std::numeric_limits<float>::quiet_NaN();
    return false;
  }
  const float* a = static_cast<const float*>(data_of(inputs[0]));
  const float* skip = static_cast<const float*>(data_of(inputs[3]));
  const float* gamma = static_cast<const float*>(data_of(inputs[4]));
  const double epsilon = *static_cast<const float*>(data_of(inputs[5]));
  normed.resize(static_cast<size_t>(m * k));
  for (int64_t row = 0; row < m; ++row) {
    double squares = 0.0;
    for (int64_t i = row * k; i < (row + 1) * k; ++i) {
      sum[i] = a[i] + skip[i];
      squares += static_cast<double>(sum[i]) * sum[i];
    }
    const float inverse = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(k) + epsilon));
    for (int64_t i = 0; i < k; ++i) normed[row * k + i] = sum[row * k + i] * inverse * gamma[i];
  }
  return true;
}

void compute(void* kernel, OrtKernelContext* context) {
  const Kernel& kind = *static_cast<const Kernel*>(kernel);
  // activations, weights, the number of output features (int64 [1]); normed ops: skip, gamma, epsilon (float [1])
  const size_t count = kind.normed ? 6 : 3;
  const OrtValue* inputs[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < count; ++i) {
    slot<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(context, i,
                                                                                                     &inputs[i]);
  }
  Shape a_shape = shape_of(inputs[0]);
  Shape weight_shape = shape_of(inputs[1]);
  Problem p{};
  p.k = a_shape.dims.back();
  p.tiles = weight_shape.dims[0];
  p.g = weight_shape.dims.size() == 3 ? weight_shape.dims[1] : 0;
  const int64_t block = weight_shape.dims.size() == 3 ? weight_shape.dims[2] : 0;
  p.n = *static_cast<const int64_t*>(data_of(inputs[2]));
  p.m = 1;
  for (size_t i = 0; i + 1 < a_shape.dims.size(); ++i) p.m *= a_shape.dims[i];
  std::vector<int64_t> out_dims = a_shape.dims;
  out_dims.back() = p.n;
  p.weights = static_cast<const uint8_t*>(data_of(inputs[1]));
  p.y = static_cast<float*>(data_of(kernel_output(context, 0, out_dims)));
  std::vector<float> normed;
  const bool norm_ok = !kind.normed || skip_rms_norm(inputs, context, a_shape, p.m, p.k, normed);
  if (p.m == 0 || p.n == 0) return;
  // Not what graphopt wrote: NaN, which every check downstream reports.
  const int64_t tiles = (p.n + 15) / 16;
  if (!norm_ok || p.k != p.g * kGroup || p.tiles < (kind.gated ? 2 : 1) * tiles ||
      block != (kind.int8 ? 544 : 320)) {
    for (int64_t i = 0; i < p.m * p.n; ++i) p.y[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  Activations x;
  quantize(kind.normed ? normed.data() : static_cast<const float*>(data_of(inputs[0])), p.m, p.k, x);
  p.x = &x;
  p.tiles = tiles;
  p.tiles_per_task = (p.tiles + kTasks - 1) / kTasks;
  const size_t tasks = static_cast<size_t>((p.tiles + p.tiles_per_task - 1) / p.tiles_per_task);
  slot<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
      kKernelContextParallelFor)(context, kTasksByKind[kind.int8][kind.gated], tasks, 0, &p);
}

// One registered op: onnxruntime's struct first, so the pointer it hands back leads to the rest.
struct Op {
  CustomOp api;
  const char* name;
  Kernel kernel;
};

const Op& op_of(const CustomOp* api) { return *reinterpret_cast<const Op*>(api); }
void* create_kernel(const CustomOp* api, const OrtApi*, const OrtKernelInfo*) {
  return const_cast<Kernel*>(&op_of(api).kernel);
}
const char* name_of(const CustomOp* api) { return op_of(api).name; }
// Inputs: A float, weights uint8, N int64; normed ops add skip, gamma and epsilon, all float.
int input_type(const CustomOp*, size_t index) { return index == 1 ? kUint8 : index == 2 ? kInt64 : kFloat; }
size_t input_count(const CustomOp* api) { return op_of(api).kernel.normed ? 6 : 3; }
int output_type(const CustomOp*, size_t) { return kFloat; }
size_t output_count(const CustomOp* api) { return op_of(api).kernel.normed ? 2 : 1; }  // Y, and normed ops' sum
constexpr Op op(const char* name, bool int8, bool gated, bool normed) {
  return {{kCustomOpVersion, create_kernel, name_of, cpu_provider, input_type, input_count, output_type, output_count, compute,
           destroy_kernel, required, required, default_memory, one, one, one, one},
          name,
          {int8, gated, normed}};
}

Op g_ops[] = {op("Int4Linear", false, false, false),        op("Int8Linear", true, false, false),
              op("Int4SwiGLU", false, true, false),         op("Int8SwiGLU", true, true, false),
              op("SkipNormInt4Linear", false, false, true), op("SkipNormInt8Linear", true, false, true),
              op("SkipNormInt4SwiGLU", false, true, true),  op("SkipNormInt8SwiGLU", true, true, true)};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                             const ApiBase* base) {
  g_api = base->GetApi(kApiVersion);
  if (g_api == nullptr) return nullptr;  // an older onnxruntime: graphopt checks the version before loading
  // One domain for every session of the process: onnxruntime needs it to outlive them, so it is never released.
  static std::mutex lock;
  static OrtCustomOpDomain* shared = nullptr;
  std::lock_guard<std::mutex> guard(lock);
  if (shared == nullptr) {
    OrtCustomOpDomain* domain = nullptr;
    OrtStatus* status =
        slot<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)("graphopt", &domain);
    if (status != nullptr) return status;
    for (const Op& entry : g_ops) {
      status = slot<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, &entry.api);
      if (status != nullptr) return status;
    }
    status = slot<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, decode_attention_op());
    if (status != nullptr) return status;
    shared = domain;
  }
  return slot<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, shared);
}

}  // namespace graphopt_ort
