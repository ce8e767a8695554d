// One query token's attention over a float32 KV cache on AVX2 CPUs: a decode step's attention; and the
// attention a chunk's queries pay to each cached key, summed (the cache policies' scoring, at the end).
//
//   out[b, 0, h, :] = sum_t softmax_t(scale * q[b, h] . k[b, h / G, t]) v[b, h / G, t]
//
// for query heads h and G = Hq / Hkv query heads per KV head (grouped-query
// attention), every cached token t visible (a single query at the end of the
// stream: no mask). Per KV head the keys are read once to score its G query
// heads, the softmax is taken in float32 (maximum subtracted; exp by a
// Cephes-style polynomial, relative error ~2e-7), and the values are read once
// for all G heads. Torch's CPU sdpa takes ~1.8x longer for this shape here
// (docs/benchmarks.md section 12e).
//
// Registered as infmllm::decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor:
//   q: [B, Hq, 1, 64] float32; k, v: [B, Hkv, L, 64] float32 (views into a larger
//   cache are fine: the last dimension must be contiguous); Hq a multiple of Hkv; L >= 1.
//   returns [B, 1, Hq, 64] float32 (sdpa's output, transposed as transformers returns it).
//   A head with a NaN or +inf score gets NaN, a -inf score weight 0, only -inf scores zeros (as torch's
//   CPU sdpa gives).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kHeadDim = 64;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// e^x for x <= 0 (scores minus their maximum): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2; below
// -87.3 the result is 0 (float32's smallest normal is e^-87.3).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 floor_x = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, floor_x, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor_x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact first product
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// q . k over the 64 dimensions, two accumulators (even and odd eighths), then halves, quarters and lanes
// folded: the order of every sum is fixed, so a score has the same bits whichever path computes it.
inline __m128 fold_halves(__m256 a, __m256 b) {
  const __m256 s = _mm256_add_ps(a, b);
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));  // [y0, y1, y2, y3]
}

// One key's four partial sums [y0, y1, y2, y3] (key_score folds them; score_keys folds four keys' at once).
inline __m128 key_partials(const __m256* qs, const float* k) {
  __m256 a = _mm256_mul_ps(qs[0], _mm256_loadu_ps(k));
  __m256 b = _mm256_mul_ps(qs[1], _mm256_loadu_ps(k + 8));
  for (int j = 2; j < 8; j += 2) {
    a = _mm256_fmadd_ps(qs[j], _mm256_loadu_ps(k + 8 * j), a);
    b = _mm256_fmadd_ps(qs[j + 1], _mm256_loadu_ps(k + 8 * j + 8), b);
  }
  return fold_halves(a, b);
}

inline float key_score(const __m256* qs, const float* k) {
  __m128 y = key_partials(qs, k);
  y = _mm_add_ps(y, _mm_movehl_ps(y, y));              // [y0 + y2, y1 + y3, ...]
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));  // (y0 + y2) + (y1 + y3)
}

// Raw scores of G query heads (qs: G x 8 registers, already scaled) over L keys, p[g * L + t]. Four keys
// at a time for all G heads, so each key row is read from memory once and then from L1, and four
// independent sums are in flight; the sums are key_score's, in the same order (the same bits).
void score_keys(const __m256* qs, int64_t G, const float* keys, int64_t key_stride, int64_t L, float* p) {
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) {
    const float* k = keys + t * key_stride;
    // The rows 16 ahead (only rows of the view: no address past it is formed): the hardware prefetcher
    // alone leaves this loop waiting on memory.
    if (t + 20 <= L) {
      for (int i = 0; i < 4; ++i) {
        const char* row = reinterpret_cast<const char*>(k + (16 + i) * key_stride);
        for (int line = 0; line < 4; ++line) _mm_prefetch(row + 64 * line, _MM_HINT_T0);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const __m256* qg = qs + 8 * g;
      __m128 y[4];
      for (int i = 0; i < 4; ++i) y[i] = key_partials(qg, k + i * key_stride);
      _MM_TRANSPOSE4_PS(y[0], y[1], y[2], y[3]);  // y[c] = lane c of the four keys
      _mm_storeu_ps(p + g * L + t, _mm_add_ps(_mm_add_ps(y[0], y[2]), _mm_add_ps(y[1], y[3])));
    }
  }
  for (; t < L; ++t) {
    for (int64_t g = 0; g < G; ++g) p[g * L + t] = key_score(qs + 8 * g, keys + t * key_stride);
  }
}

// The largest of L raw scores into *top; false if a score is NaN or +inf (nothing then is usable).
bool scan_scores(const float* p, int64_t L, float* top) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), bad = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 x = _mm256_loadu_ps(p + t);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), _mm256_cmp_ps(x, inf, _CMP_EQ_OQ)));
    top8 = _mm256_max_ps(top8, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float best = *std::max_element(lanes, lanes + 8);
  bool usable = _mm256_movemask_ps(bad) == 0;
  for (; t < L; ++t) {
    usable = usable && !std::isnan(p[t]) && p[t] != std::numeric_limits<float>::infinity();
    best = std::max(best, p[t]);
  }
  *top = best;
  return usable;
}

// p[t] = e^(p[t] - top) in place over L scores (top their finite maximum); returns their sum (>= 1: the
// maximum's own term).
float exp_shifted(float* p, int64_t L, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + t), shift));
    _mm256_storeu_ps(p + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  float total = horizontal_sum(sums);
  for (; t < L; ++t) {
    p[t] = std::exp(p[t] - top);
    total += p[t];
  }
  return total;
}

// Softmax in place over one head's L raw scores. False (the head's output becomes NaN, as sdpa's) if a
// score is NaN or +inf; a -inf score gets weight 0, and all of them -inf give zeros, as in torch's CPU sdpa.
bool softmax_head(float* p, int64_t L) {
  float top;
  if (!scan_scores(p, L, &top)) return false;
  if (top == -std::numeric_limits<float>::infinity()) {  // every key hidden: zeros, as torch's CPU sdpa gives
    std::fill(p, p + L, 0.f);
    return true;
  }
  const float inv = 1.f / exp_shifted(p, L, top);
  for (int64_t t = 0; t < L; ++t) p[t] *= inv;
  return true;
}

// out[i] = sum_t w[i * L + t] values[t] for H query heads i (out: H rows of 64, stride 64): half the head
// dimension at a time, so that H x 4 accumulators (H <= 3) and 4 value registers fit AVX2's sixteen; H is a
// template parameter so that the accumulators stay in registers.
template <int H>
void weigh_values(const float* w, int64_t L, const float* values, int64_t stride, float* out) {
  for (int64_t half = 0; half < 2; ++half) {
    __m256 acc[H][4];
    for (auto& row : acc) for (auto& a : row) a = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      const float* vt = values + t * stride + half * 32;
      if (half == 0 && t + 16 < L) {  // this half's two lines of the row 16 ahead (the other half: from L2)
        _mm_prefetch(reinterpret_cast<const char*>(vt + 16 * stride), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vt + 16 * stride + 16), _MM_HINT_T0);
      }
      const __m256 v0 = _mm256_loadu_ps(vt), v1 = _mm256_loadu_ps(vt + 8), v2 = _mm256_loadu_ps(vt + 16),
                   v3 = _mm256_loadu_ps(vt + 24);
      for (int i = 0; i < H; ++i) {
        const __m256 wi = _mm256_set1_ps(w[i * L + t]);
        acc[i][0] = _mm256_fmadd_ps(wi, v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(wi, v1, acc[i][1]);
        acc[i][2] = _mm256_fmadd_ps(wi, v2, acc[i][2]);
        acc[i][3] = _mm256_fmadd_ps(wi, v3, acc[i][3]);
      }
    }
    for (int i = 0; i < H; ++i) {
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + i * kHeadDim + half * 32 + 8 * j, acc[i][j]);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention runs on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: q, k and v must be float32");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k and v must be 4-D");
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query token, got ", q.size(2));
  TORCH_CHECK(q.size(3) == kHeadDim && k.size(3) == kHeadDim && v.size(3) == kHeadDim,
              "decode_attention: head_dim must be 64");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && Hkv > 0 && Hq % Hkv == 0 && L >= 1,
              "decode_attention: k and v must be [B, Hkv, L >= 1, 64] with Hq a multiple of Hkv, got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: the last dimension of q, k and v must be contiguous");
  const int64_t G = Hq / Hkv;
  at::Tensor out = at::empty({B, 1, Hq, kHeadDim}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(G * L);
    std::vector<char> head_ok(G);
    std::vector<__m256> qs(8 * G);
    const float fscale = static_cast<float>(scale);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const float* keys = kp + b * k.stride(0) + h * k.stride(1);
      const float* values = vp + b * v.stride(0) + h * v.stride(1);
      const int64_t value_stride = v.stride(2);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qp + b * q.stride(0) + (h * G + g) * q.stride(1);
        for (int j = 0; j < 8; ++j) qs[8 * g + j] = _mm256_mul_ps(_mm256_loadu_ps(qg + 8 * j), _mm256_set1_ps(fscale));
      }
      score_keys(qs.data(), G, keys, k.stride(2), L, weights.data());
      for (int64_t g = 0; g < G; ++g) head_ok[g] = softmax_head(weights.data() + g * L, L);
      // Values read once for up to three query heads at a time (the rest from cache for the second half).
      for (int64_t g0 = 0; g0 < G; g0 += 3) {
        const float* w = weights.data() + g0 * L;
        float* o = op + (b * Hq + h * G + g0) * kHeadDim;
        const int64_t heads = std::min<int64_t>(3, G - g0);
        switch (heads) {
          case 3: weigh_values<3>(w, L, values, value_stride, o); break;
          case 2: weigh_values<2>(w, L, values, value_stride, o); break;
          default: weigh_values<1>(w, L, values, value_stride, o); break;
        }
        for (int64_t i = 0; i < heads; ++i) {  // a NaN or +inf score: the head's output is NaN, as sdpa's
          if (!head_ok[g0 + i]) std::fill(o + i * kHeadDim, o + (i + 1) * kHeadDim, kNaN);
        }
      }
    }
  });
  return out;
}

// Adds one row's attention probabilities over its first `visible` scores (raw, in p) to acc, using p as
// scratch: acc[t] += e[t] / sum (the softmax's own division folded into the sum). As a softmax of the row
// gives: a -inf score gets weight 0, and a row with a NaN or +inf score, or whose visible scores are all
// -inf, adds NaN to all L columns (only non-finite inputs, or scores past float32's range, give these).
void add_row_probabilities(float* p, int64_t visible, int64_t L, float* acc) {
  float top;
  if (!scan_scores(p, visible, &top) || top == -std::numeric_limits<float>::infinity()) {
    std::fill(acc, acc + L, kNaN);
    return;
  }
  const __m256 inv8 = _mm256_set1_ps(1.f / exp_shifted(p, visible, top));
  int64_t t = 0;
  for (; t + 8 <= visible; t += 8) {
    _mm256_storeu_ps(acc + t, _mm256_fmadd_ps(_mm256_loadu_ps(p + t), inv8, _mm256_loadu_ps(acc + t)));
  }
  const float inv = _mm256_cvtss_f32(inv8);
  for (; t < visible; ++t) acc[t] += p[t] * inv;
}

// Queries' attention probabilities over the cached keys, summed over the query rows and the query heads of
// each KV head: the statistic the window scoring of Inf-MLLM (and H2O's accumulation) needs, without
// materialising the probabilities of every head at once (scores by torch's GEMM, the rest in one pass per
// row). q: [B, Hq, n, d] float32 (RoPE applied); k: [B, Hkv, L, d] float32 (a view with a contiguous last
// dimension); row i sees columns t <= causal_offset + i. Returns [B, Hkv, L] float32.
at::Tensor window_column_sums(const at::Tensor& q, const at::Tensor& k, double scale, int64_t causal_offset) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "window_column_sums runs on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat,
              "window_column_sums: q and k must be float32");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "window_column_sums: q and k must be 4-D, got q ", q.sizes(),
              ", k ", k.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), d = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == d && d > 0 && Hkv > 0 && Hq % Hkv == 0 && L >= 1,
              "window_column_sums: k must be [B, Hkv, L >= 1, d] with q's B and d and Hq a multiple of Hkv, got q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(k.stride(3) == 1, "window_column_sums: the last dimension of k must be contiguous");
  TORCH_CHECK(causal_offset >= 0, "window_column_sums: causal_offset must be >= 0, got ", causal_offset);
  const int64_t G = Hq / Hkv;
  at::Tensor out = at::zeros({B, Hkv, L}, k.options());
  if (n == 0 || B == 0) return out;
  // Rows in blocks, so that one block's scores never take more than 2^24 floats (64 MiB).
  const int64_t block = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, B * Hq * L));
  const at::Tensor kt = k.transpose(2, 3);
  float* acc_all = out.data_ptr<float>();
  for (int64_t start = 0; start < n; start += block) {
    const int64_t nb = std::min(block, n - start);
    // Scaled before the product, as the Python path does (the queries are a twentieth of the scores' size).
    const at::Tensor qb = q.narrow(2, start, nb).mul(scale).contiguous().view({B, Hkv, G * nb, d});
    at::Tensor scores = at::matmul(qb, kt).contiguous();  // [B, Hkv, G * nb, L]; row g * nb + i
    float* sp = scores.data_ptr<float>();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        float* acc = acc_all + bh * L;
        for (int64_t r = 0; r < G * nb; ++r) {
          const int64_t i = start + r % nb;
          // (an offset past the keys shows them all; compared first, so that a huge offset cannot overflow)
          const int64_t visible = causal_offset >= L ? L : std::min(L, causal_offset + i + 1);
          add_row_probabilities(sp + (bh * G * nb + r) * L, visible, L, acc);
        }
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(infmllm, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("window_column_sums(Tensor q, Tensor k, float scale, int causal_offset) -> Tensor");
}
TORCH_LIBRARY_IMPL(infmllm, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("window_column_sums", &window_column_sums);
}
// Inference only: a backward through these ops raises instead of giving a silent None gradient (registered
// in C++: a Python autograd registration would cost ~7 us a call, even under inference_mode).
TORCH_LIBRARY_IMPL(infmllm, Autograd, m) {
  m.impl("decode_attention", torch::autograd::autogradNotImplementedFallback());
  m.impl("window_column_sums", torch::autograd::autogradNotImplementedFallback());
}
