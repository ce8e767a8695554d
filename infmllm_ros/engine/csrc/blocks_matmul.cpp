// Q4_1 matrix-vector products on AVX2 CPUs: decode's few-row products with 4-bit weights.
//
// Weights are llama.cpp's block_q4_1 (ggml-quants.h): per output row, blocks of 32
// inputs, each 20 bytes: fp16 d, fp16 m, then 16 bytes holding q[j] in the low
// nibble of byte j and q[j + 16] in its high nibble (q in 0..15), so that
// w[j] = d * q[j] + m. Each block of an activation row is rounded to int16
// (x ~= dx * xq, dx = max|x| / 32767: at most dx / 2 off per element), so a
// block's dot product is exact integer arithmetic:
//   sum_j w[j] x[j] ~= d * dx * sum_j q[j] xq[j] + m * sum_j x[j]
// (the second sum from the unrounded x, added in double). llama.cpp rounds the
// activations to int8 instead (block_q8_1); int16 keeps them 256x finer at the
// same speed here, finer than the bfloat16 that torch's int4 kernel takes.
//
// The same for llama.cpp's block_q8_0 (34 bytes: fp16 d, then 32 int8 q;
// w[j] = d * q[j]), the LM head's type in the smollm2 GGUF.
//
// Registered as the ops
//   infmllm::q4_1_matmul(Tensor x, Tensor blocks) -> Tensor, blocks [out, in / 32, 20] uint8;
//   infmllm::q8_0_matmul(Tensor x, Tensor blocks) -> Tensor, blocks [out, in / 32, 34] uint8;
// x: [rows, in] float32, contiguous, in a multiple of 32; returns [rows, out]
// float32. A row of x with a non-finite value gives NaN in every output of that row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

struct BlockQ4_1 {
  uint16_t d, m;    // fp16 bits
  uint8_t qs[16];   // q[j] | q[j + 16] << 4
};
static_assert(sizeof(BlockQ4_1) == 20, "block_q4_1 is 20 bytes");

struct BlockQ8_0 {
  uint16_t d;       // fp16 bits
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_0) == 34, "block_q8_0 is 34 bytes");

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The activations, each block of 32 of each row rounded to int16, with its scale and its sum (added in
// double; a float32 copy for the usual rows). A row whose products or sums could overflow float32 is
// "huge" and takes the double loop (row_dot_double).
struct RoundedRows {
  int64_t rows, in, nblocks;
  std::vector<int16_t> q;
  std::vector<float> scale_sum;  // (scale, float32 sum) of each block side by side: Q4_1 loads both at once
  std::vector<double> exact_sum;
  std::vector<char> finite, huge;

  explicit RoundedRows(const at::Tensor& x)
      : rows(x.size(0)), in(x.size(1)), nblocks(x.size(1) / kGroup), q(rows * in),
        scale_sum(2 * rows * nblocks), exact_sum(rows * nblocks), finite(rows, 1), huge(rows, 0) {
    const float* xp = x.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t i = r * nblocks + b;
        const float* xb = xp + r * in + b * kGroup;
        int16_t* qb = q.data() + r * in + b * kGroup;
        float amax = 0.f, fast_total = 0.f;
        for (int64_t j = 0; j < kGroup; ++j) {
          amax = std::max(amax, std::fabs(xb[j]));  // (skips a NaN: the sum keeps it)
          fast_total += xb[j];
        }
        double total = fast_total;
        if (!std::isfinite(fast_total) || amax > 1e20f) {
          total = 0.0;  // finite exactly when every element is: 32 floats cannot overflow a double
          for (int64_t j = 0; j < kGroup; ++j) total += xb[j];
        }
        if (!std::isfinite(total)) {  // the whole row's outputs become NaN; nothing to round
          finite[r] = 0;
          std::fill(qb, qb + kGroup, int16_t{0});
          scale_sum[2 * i] = scale_sum[2 * i + 1] = 0.f;
          exact_sum[i] = 0.0;
          continue;
        }
        // In double: 32767 / amax overflows float32 for amax below ~1e-34.
        const double inv = amax > 0.f ? 32767.0 / amax : 0.0;
        for (int64_t j = 0; j < kGroup; ++j) qb[j] = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
        exact_sum[i] = total;
        scale_sum[2 * i] = amax / 32767.f;
        scale_sum[2 * i + 1] = static_cast<float>(total);
        // |d|, |m| <= 65504 (float16) and |q| <= 127: with activations below 1e20 no float32 factor, block
        // product or sum of up to 2^20 blocks can overflow; past that the row takes the double loop.
        huge[r] = huge[r] || amax > 1e20f;
      }
    }
  }
};

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& blocks, int64_t block_bytes) {
  TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), op, " runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous [rows, in] float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(2) == block_bytes,
              op, ": blocks must be a contiguous [out, in / 32, ", block_bytes, "] uint8 tensor, got ",
              blocks.sizes(), " ", blocks.scalar_type());
  TORCH_CHECK(x.size(1) == blocks.size(1) * kGroup, op, ": x has ", x.size(1), " inputs, the blocks cover ",
              blocks.size(1) * kGroup);
}

// Integer dot product of one block's weights q with 32 int16 activations, in 8 int32 lanes.
inline __m256i block_dot(const BlockQ4_1& w, const int16_t* xq) {
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
  const __m128i lo = _mm_and_si128(bytes, low_nibble);                     // q[0..15]
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble);  // q[16..31]
  return _mm256_add_epi32(
      _mm256_madd_epi16(_mm256_cvtepu8_epi16(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
      _mm256_madd_epi16(_mm256_cvtepu8_epi16(hi), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
}

inline __m256i block_dot(const BlockQ8_0& w, const int16_t* xq) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + 16));
  return _mm256_add_epi32(
      _mm256_madd_epi16(_mm256_cvtepi8_epi16(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
      _mm256_madd_epi16(_mm256_cvtepi8_epi16(hi), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
}

// Q4_1's m times the block's activation sum, in double (a huge row); Q8_0 has no offset. (rows_dot_q4_1's
// float path has its own fma.)
inline double block_offset(const BlockQ4_1& w, double sum) { return _cvtsh_ss(w.m) * sum; }
inline double block_offset(const BlockQ8_0&, double) { return 0.0; }

// One output of a huge row, accumulated in double (each block's integer dot product is exact in int32):
// it overflows to inf where the true result does, never to inf - inf = NaN.
template <typename Block>
inline float row_dot_double(const Block* wn, const int16_t* xr, const float* scale_sum, const double* exact_sum,
                            int64_t nblocks) {
  double total = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), block_dot(wn[b], xr + b * kGroup));
    int64_t dot = 0;
    for (int32_t lane : lanes) dot += lane;
    total += static_cast<double>(_cvtsh_ss(wn[b].d)) * scale_sum[2 * b] * static_cast<double>(dot) +
             block_offset(wn[b], exact_sum[b]);
  }
  return static_cast<float>(total);
}

// `next`'s blocks, N a step, into the caches while the rows before them are multiplied.
template <typename Block, int N>
inline void prefetch_ahead(const Block* next, int64_t b) {
  if (next == nullptr) return;
  // N blocks' worth of the next rows per step, one cache line at a time; every address lies inside them
  // (the last step starts N blocks before their end, its last line less than N blocks after that).
  const char* ahead = reinterpret_cast<const char*>(next) + b * N * sizeof(Block);
  for (size_t line = 0; line < N * sizeof(Block); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
}

// N outputs of one (finite, not huge) activation row: weight rows wn[0], wn[nblocks], ... Each output's
// sums run over the blocks in order, exactly as one row alone would (the same bits for any N); N rows at a
// time share each block's activation loads and keep N independent dependency chains in flight, which a
// single row's one accumulator (an FMA's latency a block) does not. `next`: the next N rows' blocks, if
// any, prefetched a block's worth per step (the hardware prefetcher alone leaves this loop waiting).
// (Q8_0, which has no offset; Q4_1 takes rows_dot_q4_1 below.)
template <typename Block, int N>
inline void rows_dot(const Block* wn, int64_t nblocks, const int16_t* xr, const float* scale_sum, float* y,
                     const Block* next) {
  static_assert(std::is_same_v<Block, BlockQ8_0>, "Q4_1 rows take rows_dot_q4_1");
  __m256 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblocks; ++b) {
    const int16_t* xb = xr + b * kGroup;
    prefetch_ahead<Block, N>(next, b);
    for (int i = 0; i < N; ++i) {
      const Block& w = wn[i * nblocks + b];
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w, xb)), _mm256_set1_ps(_cvtsh_ss(w.d) * scale_sum[2 * b]),
                               acc[i]);
    }
  }
  for (int i = 0; i < N; ++i) y[i] = horizontal_sum(acc[i]);
}

// rows_dot for Q4_1 with fewer instructions a block, the same bits: the weights' bytes are widened to 16 bits
// straight from memory and split into nibbles there (low: & 0x0F, high: >> 4, the same q[j] and q[j + 16]
// lanes as block_dot), and d and m, side by side in the block, are converted together by one vcvtph2ps
// and met by the block's (scale, sum) pair: lane 0 the product d * scale, lane 1 the offset's
// fma(m, sum, offset), the scalar operations rows_dot did for Q4_1 before. (Measured: the products were bound by
// instructions, not memory; docs/benchmarks.md section 12i.)
template <int N>
inline void rows_dot_q4_1(const BlockQ4_1* wn, int64_t nblocks, const int16_t* xr, const float* scale_sum,
                          float* y, const BlockQ4_1* next) {
  __m256 acc[N];
  __m128 offsets[N];  // lane 1: the sum of m * sum
  for (int i = 0; i < N; ++i) {
    acc[i] = _mm256_setzero_ps();
    offsets[i] = _mm_setzero_ps();
  }
  const __m256i low_nibble = _mm256_set1_epi16(0x0F);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int16_t* xb = xr + b * kGroup;
    prefetch_ahead<BlockQ4_1, N>(next, b);
    const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
    const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16));
    const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(scale_sum + 2 * b)));
    for (int i = 0; i < N; ++i) {
      const BlockQ4_1& w = wn[i * nblocks + b];
      const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs)));
      const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(q, low_nibble), x_low),
                                           _mm256_madd_epi16(_mm256_srli_epi16(q, 4), x_high));
      int32_t dm_bits;
      std::memcpy(&dm_bits, &w.d, sizeof dm_bits);  // d and m: two adjacent fp16
      const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
      offsets[i] = _mm_fmadd_ps(dm, pair, offsets[i]);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcastss_ps(_mm_mul_ps(dm, pair)), acc[i]);
    }
  }
  for (int i = 0; i < N; ++i) y[i] = horizontal_sum(acc[i]) + _mm_cvtss_f32(_mm_movehdup_ps(offsets[i]));
}

template <typename Block>
at::Tensor blocks_matmul(const char* op, const at::Tensor& x, const at::Tensor& blocks) {
  check_inputs(op, x, blocks, sizeof(Block));
  at::Tensor y = at::empty({x.size(0), blocks.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const RoundedRows a(x);
  const int64_t out = blocks.size(0);
  const auto* w = reinterpret_cast<const Block*>(blocks.data_ptr<uint8_t>());
  float* yp = y.data_ptr<float>();
  constexpr int64_t kRowsAtOnce = 4;
  // At least 32 output rows a task: a smaller grain costs more in thread hand-offs than it saves.
  at::parallel_for(0, out, 32, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += kRowsAtOnce) {
      const int64_t count = std::min(kRowsAtOnce, end - n0);
      const Block* wn = w + n0 * a.nblocks;
      const Block* next = n0 + 2 * kRowsAtOnce <= out ? wn + kRowsAtOnce * a.nblocks : nullptr;  // prefetched
      for (int64_t r = 0; r < a.rows; ++r) {
        const int16_t* xr = a.q.data() + r * a.in;
        const float* pairs = a.scale_sum.data() + 2 * r * a.nblocks;  // (scale, sum) of each block
        float* yr = yp + r * out + n0;
        if (!a.finite[r]) {
          std::fill(yr, yr + count, std::numeric_limits<float>::quiet_NaN());
        } else if (a.huge[r]) {
          for (int64_t i = 0; i < count; ++i) {
            yr[i] = row_dot_double(wn + i * a.nblocks, xr, pairs, a.exact_sum.data() + r * a.nblocks, a.nblocks);
          }
        } else if constexpr (std::is_same_v<Block, BlockQ4_1>) {
          if (count == kRowsAtOnce) {
            rows_dot_q4_1<kRowsAtOnce>(wn, a.nblocks, xr, pairs, yr, next);
          } else {
            for (int64_t i = 0; i < count; ++i) rows_dot_q4_1<1>(wn + i * a.nblocks, a.nblocks, xr, pairs, yr + i, nullptr);
          }
        } else if (count == kRowsAtOnce) {
          rows_dot<Block, kRowsAtOnce>(wn, a.nblocks, xr, pairs, yr, next);
        } else {
          for (int64_t i = 0; i < count; ++i) {
            rows_dot<Block, 1>(wn + i * a.nblocks, a.nblocks, xr, pairs, yr + i, nullptr);
          }
        }
      }
    }
  });
  return y;
}

at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<BlockQ4_1>("q4_1_matmul", x, blocks);
}

at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<BlockQ8_0>("q8_0_matmul", x, blocks);
}

}  // namespace

TORCH_LIBRARY(infmllm, m) {
  m.def("q4_1_matmul(Tensor x, Tensor blocks) -> Tensor");
  m.def("q8_0_matmul(Tensor x, Tensor blocks) -> Tensor");
}
TORCH_LIBRARY_IMPL(infmllm, CPU, m) {
  m.impl("q4_1_matmul", &q4_1_matmul);
  m.impl("q8_0_matmul", &q8_0_matmul);
}
// Inference only: a backward through these ops raises instead of giving a silent None gradient (registered
// in C++: a Python autograd registration would cost ~7 us a call, even under inference_mode).
TORCH_LIBRARY_IMPL(infmllm, Autograd, m) {
  m.impl("q4_1_matmul", torch::autograd::autogradNotImplementedFallback());
  m.impl("q8_0_matmul", torch::autograd::autogradNotImplementedFallback());
}
