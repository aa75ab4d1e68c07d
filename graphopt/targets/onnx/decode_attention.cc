// graphopt.DecodeAttention: onnxruntime's com.microsoft.GroupQueryAttention over a key/value cache, built for
// the decode step (one new token per row): each key/value head's cache is read once for all the query heads
// that share it. A prompt (several tokens per row) takes the same arithmetic, one task per token.
//
// onnxruntime's CPU kernel computes every query head on its own: a GEMM for the scores, a softmax, a
// GEMM with the values, one task per (row, query head). On one new token those are matrix-vector
// products over the cache, and a head's cache is read once per query head of its group. Here one
// task takes a stretch of one key/value head's cache and all the query heads of its group, so the
// cache is read from memory once per step, and a long cache is split into stretches (as in
// flash-decoding) so every thread has work; the stretches' softmax sums are merged at the end.
//
// Inputs, as GroupQueryAttention's (S tokens per row):
//   0 query float [B, S, H*D], or [B, S, (H + 2Hk)*D] with keys and values packed after the queries
//   1 key float [B, S, Hk*D] (optional: absent when packed)    2 value float [B, S, Hk*D] (optional)
//   3 past_key, 4 past_value float [B, Hk, L, D]
//   5 seqlens_k int32 [B]: the row's filled slots after the step, minus one; its S tokens go to the S slots
//     before that one's end, and token s attends to every slot up to its own
//   6 total_sequence_length int32 [] (the attention bias's last dimension)
//   7 cos_cache, 8 sin_cache float [P, D/2] (optional: with do_rotary, half-split rotary of q and k)
//   9 position_ids int64 [B, S] (optional): the row of the tables for each token; without, its slot. (On a
//     first prompt onnxruntime's own kernel reads table row s for token s of every row, whatever position_ids
//     say; graphopt's steps give position_ids that agree with that wherever they use it.)
//   10 attention_bias float [B or 1, H or 1, S, T] (optional): added to the scaled scores
//   11 heads int64 [3]: H, Hk, do_rotary      12 scale float [1]
// Outputs: 0 float [B, S, H*D]; 1 present_key, 2 present_value float [B, Hk, L, D]. When the caller
// binds the present buffers to the past ones (graphopt's generation loop does), only the new tokens'
// slots are written; otherwise the past is copied into the present first.
//
// A token whose every slot is masked (a padding token of a left-padded prompt, whose output no other token
// reads) gets zeros under -inf masks and the mean of its slots' values under transformers' finite minimum,
// as PyTorch's attention computes it; onnxruntime's kernel gives other values there.
//
// A step onnxruntime would reject (a slot past the cache, a head count that does not divide, shapes
// that disagree) gives NaN outputs, which every check downstream reports.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ort_custom_op.h"

namespace graphopt_ort {
namespace {

constexpr int64_t kMaxStretch = 256;  // cache slots per task: their keys and values stay in L2 between query heads
constexpr int64_t kMinStretch = 32;
constexpr int64_t kMinTasks = 8;      // per call, for onnxruntime's intra-op threads
constexpr int64_t kPromptTasks = 32;  // per call with several tokens per row (later tokens have more slots to read)
constexpr int64_t kMaxGroup = 16;     // query heads per key/value head
constexpr int64_t kMaxHeadSize = 256;

struct Problem {
  int64_t batch, seq, heads, kv_heads, group, head_size, cache_len;
  const float* queries;  // [B, S, H, D], rotated
  const float* keys;     // the present cache [B, Hk, L, D], the new tokens written
  const float* values;
  const int32_t* filled;  // [B]: the row's filled slots after this step, minus one (GroupQueryAttention's seqlens_k)
  const float* bias;      // [.., S, T] rows, or nullptr
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride;
  float scale;
  int64_t stretch, stretches;  // one token per row: slots per task, tasks per (row, key/value head)
  int64_t token_tasks;         // several: tasks per (row, key/value head)
  float* partial;              // one token per row: [B, H, stretches, D + 2], what attend() returns per stretch
  float* y;                    // [B, S, H*D]
};

float dot(const float* a, const float* b, int64_t n) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), sum);
  return _mm512_reduce_add_ps(sum);
}

// Token s of row b, query head h, over cache slots [first, end): out[0] = the largest score, out[1] = the sum of
// e^(score - largest), out[2 ..] = the sum of e^(score - largest) * value. scores holds end - first + 16 floats.
void attend(const Problem& p, int64_t b, int64_t h, int64_t s, int64_t first, int64_t end, float* scores,
            float* out) {
  const int64_t d = p.head_size, g = h / p.group;
  out[0] = -std::numeric_limits<float>::infinity();
  std::fill(out + 1, out + d + 2, 0.0f);
  if (first >= end) return;
  const float* keys = p.keys + (b * p.kv_heads + g) * p.cache_len * d;
  const float* values = p.values + (b * p.kv_heads + g) * p.cache_len * d;
  const float* q = p.queries + ((b * p.seq + s) * p.heads + h) * d;
  const float* bias = p.bias == nullptr ? nullptr
                                        : p.bias + b * p.bias_batch_stride + h * p.bias_head_stride + s * p.bias_row_stride;
  const int64_t n = end - first;
  float largest = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t t = 0; t < n; ++t) {
    float score = dot(q, keys + (first + t) * d, d) * p.scale;
    if (bias != nullptr) score += bias[first + t];
    scores[t] = score;
    largest = std::max(largest, score);
    nan |= std::isnan(score);
  }
  if (nan) {  // a NaN anywhere in the inputs comes out as NaN, as it would from the float computation
    out[0] = 0.0f;
    std::fill(out + 1, out + d + 2, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  out[0] = largest;
  if (!(largest > -std::numeric_limits<float>::infinity())) return;  // every slot masked (or NaN): nothing to attend
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = n - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e = exp_lanes(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + t), _mm512_set1_ps(largest)));
    _mm512_mask_storeu_ps(scores + t, lanes, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes, e));
  }
  __m512 acc[kMaxHeadSize / 16];
  for (int64_t j = 0; j < d / 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 weight = _mm512_set1_ps(scores[t]);
    const float* v = values + (first + t) * d;
    for (int64_t j = 0; j < d / 16; ++j) acc[j] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(v + 16 * j), acc[j]);
  }
  out[1] = _mm512_reduce_add_ps(sum);
  for (int64_t j = 0; j < d / 16; ++j) _mm512_storeu_ps(out + 2 + 16 * j, acc[j]);
}

// One token per row: a stretch of one key/value head's cache, for each query head of its group (merged later).
void stretch_task(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t b = static_cast<int64_t>(index) / (p.kv_heads * p.stretches);
  const int64_t g = static_cast<int64_t>(index) / p.stretches % p.kv_heads;
  const int64_t s = static_cast<int64_t>(index) % p.stretches;
  const int64_t first = s * p.stretch, end = std::min<int64_t>(p.filled[b] + 1, first + p.stretch);
  alignas(64) float scores[kMaxStretch + 16];
  for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
    attend(p, b, h, 0, first, end, scores, p.partial + ((b * p.heads + h) * p.stretches + s) * (p.head_size + 2));
  }
}

// The stretches of each (row, head) merged: the softmax over all of them, then its weighted sum of values.
void merge_stretches(const Problem& p) {
  const int64_t d = p.head_size;
  for (int64_t bh = 0; bh < p.batch * p.heads; ++bh) {
    const float* part = p.partial + bh * p.stretches * (d + 2);
    float largest = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < p.stretches; ++s) largest = std::max(largest, part[s * (d + 2)]);
    float* out = p.y + bh * d;  // [B, 1, H*D]: row b's head h at (b * H + h) * D
    std::fill(out, out + d, 0.0f);
    if (!(largest > -std::numeric_limits<float>::infinity())) continue;  // every slot masked: zeros
    float sum = 0.0f;
    for (int64_t s = 0; s < p.stretches; ++s) {
      const float* stretch = part + s * (d + 2);
      if (!(stretch[0] > -std::numeric_limits<float>::infinity())) continue;
      const float weight = std::exp(stretch[0] - largest);
      sum += weight * stretch[1];
      for (int64_t j = 0; j < d; ++j) out[j] += weight * stretch[2 + j];
    }
    const float inverse = 1.0f / sum;
    for (int64_t j = 0; j < d; ++j) out[j] *= inverse;
  }
}

// Several tokens per row (a prompt): token s of row b attends to the slots up to its own. One task per (row,
// key/value head, j) takes tokens j, j + k, j + 2k ... (k = token_tasks, interleaved: later tokens see more slots),
// for each query head of the key/value head.
void token_task(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t j = static_cast<int64_t>(index) % p.token_tasks;
  const int64_t g = static_cast<int64_t>(index) / p.token_tasks % p.kv_heads;
  const int64_t b = static_cast<int64_t>(index) / (p.token_tasks * p.kv_heads);
  const int64_t d = p.head_size, before = p.filled[b] + 1 - p.seq;  // the slots filled before this step
  std::vector<float> scores(static_cast<size_t>(p.filled[b] + 1 + 16));
  alignas(64) float out[kMaxHeadSize + 2];
  for (int64_t s = j; s < p.seq; s += p.token_tasks) {
    for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
      attend(p, b, h, s, 0, before + s + 1, scores.data(), out);
      float* y = p.y + ((b * p.seq + s) * p.heads + h) * d;
      const float inverse = out[0] > -std::numeric_limits<float>::infinity() ? 1.0f / out[1] : 0.0f;
      for (int64_t i = 0; i < d; ++i) y[i] = out[2 + i] * inverse;
    }
  }
}

// x[i], x[i + D/2] rotated by the angle whose cosine and sine are cos[i], sin[i] (rotary, half-split).
void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* y) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float first = x[i], second = x[i + half];
    y[i] = first * cos[i] - second * sin[i];
    y[i + half] = second * cos[i] + first * sin[i];
  }
}

void fill_nan(float* data, int64_t n) { std::fill(data, data + n, std::numeric_limits<float>::quiet_NaN()); }

void compute(void*, OrtKernelContext* context) {
  const OrtValue* in[13] = {};
  for (size_t i = 0; i < 13; ++i) {
    slot<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(context, i, &in[i]);
  }
  const Shape query_shape = shape_of(in[0]), cache_shape = shape_of(in[3]);
  const int64_t* heads = static_cast<const int64_t*>(data_of(in[11]));
  Problem p{};
  p.heads = heads[0];
  p.kv_heads = heads[1];
  const bool rotary = heads[2] != 0 && in[7] != nullptr && in[8] != nullptr;
  p.scale = *static_cast<const float*>(data_of(in[12]));
  const bool ranked = query_shape.dims.size() == 3;
  p.batch = ranked ? query_shape.dims[0] : 0;
  p.seq = ranked ? query_shape.dims[1] : 0;
  const bool packed = in[1] == nullptr;
  const int64_t width = ranked ? query_shape.dims[2] : 0;
  p.head_size = p.heads > 0 ? (packed ? width / (p.heads + 2 * p.kv_heads) : width / p.heads) : 0;
  p.cache_len = cache_shape.dims.size() == 4 ? cache_shape.dims[2] : 0;
  const int64_t d = p.head_size, tokens = p.batch * p.seq;
  float* y = static_cast<float*>(data_of(kernel_output(context, 0, {p.batch, p.seq, p.heads * d})));
  float* keys = static_cast<float*>(data_of(kernel_output(context, 1, cache_shape.dims)));
  float* values = static_cast<float*>(data_of(kernel_output(context, 2, cache_shape.dims)));
  const float* past_keys = static_cast<const float*>(data_of(in[3]));
  const float* past_values = static_cast<const float*>(data_of(in[4]));
  const int64_t cache_size = element_count(cache_shape);
  const int32_t* filled = static_cast<const int32_t*>(data_of(in[5]));
  const int64_t total = *static_cast<const int32_t*>(data_of(in[6]));
  const int64_t* position_ids = in[9] != nullptr ? static_cast<const int64_t*>(data_of(in[9])) : nullptr;
  // The shapes GroupQueryAttention checks.
  bool ok = ranked && p.seq >= 1 && p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.heads / p.kv_heads <= kMaxGroup &&
            d > 0 && d % 16 == 0 && d <= kMaxHeadSize && width == d * (packed ? p.heads + 2 * p.kv_heads : p.heads) &&
            cache_shape.dims.size() == 4 && cache_shape.dims[0] == p.batch && cache_shape.dims[1] == p.kv_heads &&
            cache_shape.dims[3] == d && element_count(shape_of(in[5])) == p.batch && shape_of(in[4]).dims == cache_shape.dims;
  if (ok && !packed) {
    ok = in[2] != nullptr && element_count(shape_of(in[1])) == tokens * p.kv_heads * d &&
         element_count(shape_of(in[2])) == tokens * p.kv_heads * d;
  }
  // Row b's tokens go to slots filled[b] + 1 - S .. filled[b], inside the cache.
  for (int64_t b = 0; ok && b < p.batch; ++b) ok = filled[b] + 1 >= p.seq && filled[b] < p.cache_len && filled[b] < total;
  if (ok && rotary) {
    const Shape table = shape_of(in[7]);
    ok = table.dims.size() == 2 && table.dims[1] == d / 2 && shape_of(in[8]).dims == table.dims;
    const int64_t positions = ok ? table.dims[0] : 0;
    if (ok && position_ids != nullptr) {
      ok = element_count(shape_of(in[9])) == tokens;
      for (int64_t i = 0; ok && i < tokens; ++i) ok = position_ids[i] >= 0 && position_ids[i] < positions;
    }
    for (int64_t b = 0; ok && position_ids == nullptr && b < p.batch; ++b) ok = filled[b] < positions;
  }
  if (ok && in[10] != nullptr) {
    const Shape bias = shape_of(in[10]);
    ok = bias.dims.size() == 4 && (bias.dims[0] == 1 || bias.dims[0] == p.batch) &&
         (bias.dims[1] == 1 || bias.dims[1] == p.heads) && bias.dims[2] == p.seq && bias.dims[3] == total;
    p.bias = static_cast<const float*>(data_of(in[10]));
    p.bias_row_stride = total;
    p.bias_head_stride = ok && bias.dims[1] > 1 ? p.seq * total : 0;
    p.bias_batch_stride = ok && bias.dims[0] > 1 ? bias.dims[1] * p.seq * total : 0;
  }
  if (!ok) {
    fill_nan(y, tokens * p.heads * d);
    fill_nan(keys, cache_size);
    fill_nan(values, cache_size);
    return;
  }
  if (keys != past_keys) std::memcpy(keys, past_keys, sizeof(float) * cache_size);
  if (values != past_values) std::memcpy(values, past_values, sizeof(float) * cache_size);
  p.group = p.heads / p.kv_heads;

  // The new tokens: queries rotated into scratch rows, keys rotated and values copied into their slots. A token's
  // angles are row position_ids[b, s] of the tables, else row (its slot) as GroupQueryAttention makes them.
  const float* query = static_cast<const float*>(data_of(in[0]));
  const float* new_keys = packed ? query + p.heads * d : static_cast<const float*>(data_of(in[1]));
  const float* new_values = packed ? query + (p.heads + p.kv_heads) * d : static_cast<const float*>(data_of(in[2]));
  const int64_t query_stride = packed ? width : p.heads * d, kv_stride = packed ? width : p.kv_heads * d;
  std::vector<float> queries(static_cast<size_t>(tokens * p.heads * d));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t s = 0; s < p.seq; ++s) {
      const int64_t token = b * p.seq + s, at = filled[b] + 1 - p.seq + s;
      const float* cos = nullptr;
      const float* sin = nullptr;
      if (rotary) {
        const int64_t row = position_ids != nullptr ? position_ids[token] : at;
        cos = static_cast<const float*>(data_of(in[7])) + row * (d / 2);
        sin = static_cast<const float*>(data_of(in[8])) + row * (d / 2);
      }
      const float* q = query + token * query_stride;
      for (int64_t h = 0; h < p.heads; ++h) {
        float* to = queries.data() + (token * p.heads + h) * d;
        if (rotary) rotate(q + h * d, cos, sin, d, to);
        else std::memcpy(to, q + h * d, sizeof(float) * d);
      }
      const float* k = new_keys + token * kv_stride;
      const float* v = new_values + token * kv_stride;
      for (int64_t g = 0; g < p.kv_heads; ++g) {
        const int64_t slot_at = ((b * p.kv_heads + g) * p.cache_len + at) * d;
        if (rotary) rotate(k + g * d, cos, sin, d, keys + slot_at);
        else std::memcpy(keys + slot_at, k + g * d, sizeof(float) * d);
        std::memcpy(values + slot_at, v + g * d, sizeof(float) * d);
      }
    }
  }
  p.queries = queries.data();
  p.keys = keys;
  p.values = values;
  p.filled = filled;
  p.y = y;
  const int64_t pairs = p.batch * p.kv_heads;
  using ParallelFor = OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
  if (p.seq > 1) {  // a prompt: about kPromptTasks tasks, each a key/value head's share of a row's tokens
    p.token_tasks = std::min(p.seq, std::max<int64_t>(1, (kPromptTasks + pairs - 1) / pairs));
    slot<ParallelFor>(kKernelContextParallelFor)(context, token_task, static_cast<size_t>(pairs * p.token_tasks), 0,
                                                 &p);
    return;
  }
  // One token per row: stretches of at most kMaxStretch slots, at least kMinStretch, enough tasks for the threads.
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) longest = std::max<int64_t>(longest, filled[b] + 1);
  int64_t stretches = std::max((longest + kMaxStretch - 1) / kMaxStretch, (kMinTasks + pairs - 1) / pairs);
  stretches = std::max<int64_t>(1, std::min(stretches, (longest + kMinStretch - 1) / kMinStretch));
  p.stretch = (longest + stretches - 1) / stretches;
  p.stretches = (longest + p.stretch - 1) / p.stretch;
  std::vector<float> partial(static_cast<size_t>(p.batch * p.heads * p.stretches * (d + 2)));
  p.partial = partial.data();
  slot<ParallelFor>(kKernelContextParallelFor)(context, stretch_task, static_cast<size_t>(pairs * p.stretches), 0, &p);
  merge_stretches(p);
}

int g_kernel = 0;  // the op keeps no state: every kernel is this one
void* create_kernel(const CustomOp*, const OrtApi*, const OrtKernelInfo*) { return &g_kernel; }
const char* name_of(const CustomOp*) { return "DecodeAttention"; }
int input_type(const CustomOp*, size_t index) {
  switch (index) {
    case 5: case 6: return kInt32;
    case 9: case 11: return kInt64;
    default: return kFloat;
  }
}
size_t input_count(const CustomOp*) { return 13; }
int output_type(const CustomOp*, size_t) { return kFloat; }
size_t output_count(const CustomOp*) { return 3; }
int input_characteristic(const CustomOp*, size_t index) {
  switch (index) {
    case 1: case 2: case 7: case 8: case 9: case 10: return kOptional;
    default: return kRequired;
  }
}
const CustomOp g_op = {kCustomOpVersion, create_kernel, name_of, cpu_provider, input_type, input_count, output_type, output_count,
                       compute, destroy_kernel, input_characteristic, required, default_memory, one, one, one, one};

}  // namespace

const CustomOp* decode_attention_op() { return &g_op; }

}  // namespace graphopt_ort
