// One query token's attention over a float32 KV cache on AVX2 CPUs: a decode step's attention.
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

// Softmax weights of one query head over L keys, written to p. False (the head's output becomes NaN, as
// sdpa's) if a score is NaN or +inf; a -inf score gets weight 0, and all of them -inf give zeros, as in
// torch's CPU sdpa.
bool score_head(const float* q, float scale, const float* keys, int64_t key_stride, int64_t L, float* p) {
  __m256 qs[8];
  for (int j = 0; j < 8; ++j) qs[j] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * j), _mm256_set1_ps(scale));
  float top = -std::numeric_limits<float>::infinity();
  bool usable = true;
  for (int64_t t = 0; t < L; ++t) {
    const float* k = keys + t * key_stride;
    __m256 a = _mm256_mul_ps(qs[0], _mm256_loadu_ps(k));
    __m256 b = _mm256_mul_ps(qs[1], _mm256_loadu_ps(k + 8));
    for (int j = 2; j < 8; j += 2) {
      a = _mm256_fmadd_ps(qs[j], _mm256_loadu_ps(k + 8 * j), a);
      b = _mm256_fmadd_ps(qs[j + 1], _mm256_loadu_ps(k + 8 * j + 8), b);
    }
    const float s = horizontal_sum(_mm256_add_ps(a, b));
    usable = usable && !std::isnan(s) && s != std::numeric_limits<float>::infinity();
    top = std::max(top, s);
    p[t] = s;
  }
  if (!usable) return false;
  if (top == -std::numeric_limits<float>::infinity()) {  // every key hidden: zeros, as torch's CPU sdpa gives
    std::fill(p, p + L, 0.f);
    return true;
  }
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
  const float inv = 1.f / total;  // total >= 1: the maximum's own term
  for (t = 0; t < L; ++t) p[t] *= inv;
  return true;
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
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const float* keys = kp + b * k.stride(0) + h * k.stride(1);
      const float* values = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t g = 0; g < G; ++g) {
        head_ok[g] = score_head(qp + b * q.stride(0) + (h * G + g) * q.stride(1), static_cast<float>(scale), keys,
                                k.stride(2), L, weights.data() + g * L);
      }
      // Values read once for up to three query heads at a time, a half of the head dimension at a time, so
      // that 3 x 4 accumulators and 4 value registers fit AVX2's sixteen.
      for (int64_t g0 = 0; g0 < G; g0 += 3) {
        const int64_t heads = std::min<int64_t>(3, G - g0);
        for (int64_t half = 0; half < 2; ++half) {
          __m256 acc[3][4];
          for (auto& row : acc) for (auto& a : row) a = _mm256_setzero_ps();
          for (int64_t t = 0; t < L; ++t) {
            const float* vt = values + t * v.stride(2) + half * 32;
            const __m256 v0 = _mm256_loadu_ps(vt), v1 = _mm256_loadu_ps(vt + 8), v2 = _mm256_loadu_ps(vt + 16),
                         v3 = _mm256_loadu_ps(vt + 24);
            for (int64_t i = 0; i < heads; ++i) {
              const __m256 w = _mm256_set1_ps(weights[(g0 + i) * L + t]);
              acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);
              acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);
              acc[i][2] = _mm256_fmadd_ps(w, v2, acc[i][2]);
              acc[i][3] = _mm256_fmadd_ps(w, v3, acc[i][3]);
            }
          }
          for (int64_t i = 0; i < heads; ++i) {
            float* o = op + (b * Hq + h * G + g0 + i) * kHeadDim + half * 32;
            for (int j = 0; j < 4; ++j) {
              _mm256_storeu_ps(o + 8 * j, head_ok[g0 + i] ? acc[i][j]
                                                          : _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()));
            }
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(infmllm, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(infmllm, CPU, m) { m.impl("decode_attention", &decode_attention); }
// Inference only: a backward through these ops raises instead of giving a silent None gradient (registered
// in C++: a Python autograd registration would cost ~7 us a call, even under inference_mode).
TORCH_LIBRARY_IMPL(infmllm, Autograd, m) {
  m.impl("decode_attention", torch::autograd::autogradNotImplementedFallback());
}
