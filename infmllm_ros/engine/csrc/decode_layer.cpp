// A decode step's per-layer arithmetic around the attention, in two calls instead of ~40 small tensor calls.
//
// One token through a Llama-layout decoder layer (pre-norm, q/k/v/o projections, RoPE on the query and key
// heads, a gated SiLU MLP) is, apart from the cache and the attention, a string of small operations on
// one row. Called one by one from Python each costs a dispatch and an interpreter round trip (~5-10 us
// each on a 2-core CPU), about as much as the 4-bit products themselves for SmolLM2-135M
// (docs/benchmarks.md section 12g). These two ops run that string in C++ with the same arithmetic in the
// same order, so a step gives the same bits as the model's own forward:
//
//   infmllm::decode_qkv(hidden, norm_weight, eps, qkv_blocks, q_heads, kv_heads, cos, sin)
//       -> (query [1, Hq, 1, D], key [1, Hkv, 1, D], value [1, Hkv, 1, D])
//     x = RMSNorm(hidden); [q | k | v] = x @ qkv_blocks (one q4_1 product over the three layers'
//     joined blocks); q, k rotated: t * cos + rotate_half(t) * sin, rotate_half(t) = [-t2, t1].
//   infmllm::decode_mlp(hidden, attention, o_blocks, norm_weight, eps, gate_up_blocks, down_blocks)
//       -> hidden' [1, 1, H]
//     h = hidden + o_proj(attention); x = RMSNorm(h); [g | u] = x @ gate_up_blocks;
//     hidden' = h + down_proj(silu(g) * u).
//
// RMSNorm is Llama's: weight * (x * rsqrt(mean(x^2) + eps)), its reduction and rsqrt done by ATen's own
// kernels on the shapes the Python code gives them (a reduction's bits depend on its kernel's order);
// silu is ATen's too. The elementwise products and sums are exact IEEE operations whichever code runs
// them, written here as plain loops; contraction to fused multiply-adds is off in this file, as each of
// torch's separate mul and add calls rounds on its own. hidden, attention, cos, sin and the norm weights
// are float32; blocks are llama.cpp's block_q4_1 rows ([out, in / 32, 20] uint8, csrc/blocks_matmul.cpp).
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("infmllm::q4_1_matmul", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, blocks);
}

void check_row(const char* op, const char* name, const at::Tensor& t, int64_t width) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == width &&
                  t.dim() >= 1 && t.size(-1) == width,
              op, ": ", name, " must be one contiguous float32 row of ", width, " on the CPU, got ", t.sizes(), " ",
              t.scalar_type());
}

void check_blocks(const char* op, const char* name, const at::Tensor& blocks, int64_t out, int64_t in) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(0) == out && blocks.size(1) * 32 == in, op, ": ", name,
              " must be [", out, ", ", in / 32, ", 20] q4_1 blocks, got ", blocks.sizes());
}

// hidden [1, 1, H] and its norm's weight [H], as both ops take them: returns H.
int64_t check_hidden(const char* op, const at::Tensor& hidden, const at::Tensor& norm_weight) {
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be [1, 1, hidden], got ", hidden.sizes());
  const int64_t width = hidden.size(-1);
  check_row(op, "hidden", hidden, width);
  check_row(op, "norm_weight", norm_weight, width);
  return width;
}

// Llama's RMSNorm of one row [1, 1, H], as LlamaRMSNorm.forward computes it for float32:
// rsqrt(mean(x^2) + eps). Only the sum goes to ATen (its reduction order sets the bits); the rest is what
// ATen computes for it, one scalar at a time: pow(x, 2) is x * x, mean is that sum divided by H (sum, then
// div_), the eps is added in float32, and rsqrt of one element is 1 / sqrt (both correctly rounded).
// (Four ATen calls fewer per norm; the direct step checks these bits against the Python path before use.)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t width = x.numel();
  const float* xp = x.data_ptr<float>();
  at::Tensor squares = at::empty_like(x);
  float* sp = squares.data_ptr<float>();
  for (int64_t i = 0; i < width; ++i) sp[i] = xp[i] * xp[i];
  const float total = at::sum(squares, {-1}).item<float>();
  const float variance = total / static_cast<float>(width) + static_cast<float>(eps);
  const float r = 1.0f / std::sqrt(variance);
  at::Tensor out = at::empty_like(x);
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < width; ++i) op[i] = wp[i] * (xp[i] * r);
  return out;
}

// a + b for two rows of the same length, a new row shaped as a.
at::Tensor add_rows(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty_like(a);
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) op[i] = ap[i] + bp[i];
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_qkv(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                          double eps, const at::Tensor& qkv_blocks, int64_t q_heads,
                                                          int64_t kv_heads, const at::Tensor& cos,
                                                          const at::Tensor& sin) {
  constexpr const char* op = "decode_qkv";
  const int64_t width = check_hidden(op, hidden, norm_weight);
  TORCH_CHECK(qkv_blocks.dim() == 3, op, ": qkv_blocks must be [out, in / 32, 20] q4_1 blocks, got ", qkv_blocks.sizes());
  TORCH_CHECK(q_heads > 0 && kv_heads > 0 && q_heads <= qkv_blocks.size(0) && kv_heads <= qkv_blocks.size(0), op,
              ": head counts must be positive and at most the blocks' rows, got ", q_heads, " and ", kv_heads);
  TORCH_CHECK(cos.dim() >= 1, op, ": cos must be [..., head_dim], got ", cos.sizes());
  const int64_t dim = cos.size(-1), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, op, ": the head dimension must be even, got ", dim);
  check_row(op, "cos", cos, dim);
  check_row(op, "sin", sin, dim);
  check_blocks(op, "qkv_blocks", qkv_blocks, (q_heads + 2 * kv_heads) * dim, width);

  const at::Tensor x = rms_norm(hidden, norm_weight, eps);
  const at::Tensor y = q4_1_matmul(x.view({1, width}), qkv_blocks);  // [1, (Hq + 2 Hkv) D]: q | k | v
  const int64_t rotated = q_heads + kv_heads;
  at::Tensor both = at::empty({1, rotated, 1, dim}, y.options());  // the query and key heads, rotated
  const float* src = y.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* dst = both.data_ptr<float>();
  for (int64_t h = 0; h < rotated; ++h) {
    const float* t = src + h * dim;
    float* o = dst + h * dim;
    for (int64_t j = 0; j < dim; ++j) {
      const float turned = j < half ? -t[j + half] : t[j - half];  // rotate_half
      const float straight = t[j] * c[j];
      const float across = turned * s[j];
      o[j] = straight + across;
    }
  }
  at::Tensor value = y.narrow(1, rotated * dim, kv_heads * dim).view({1, 1, kv_heads, dim}).transpose(1, 2);
  return {both.narrow(1, 0, q_heads), both.narrow(1, q_heads, kv_heads), value};
}

at::Tensor decode_mlp(const at::Tensor& hidden, const at::Tensor& attention, const at::Tensor& o_blocks,
                      const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_blocks,
                      const at::Tensor& down_blocks) {
  constexpr const char* op = "decode_mlp";
  const int64_t width = check_hidden(op, hidden, norm_weight);
  TORCH_CHECK(attention.device().is_cpu() && attention.scalar_type() == at::kFloat, op,
              ": attention must be float32 on the CPU, got ", attention.scalar_type());
  const int64_t heads_width = attention.numel();
  check_blocks(op, "o_blocks", o_blocks, width, heads_width);
  TORCH_CHECK(gate_up_blocks.dim() == 3 && gate_up_blocks.size(0) % 2 == 0, op,
              ": gate_up_blocks must hold the gate's and the up projection's rows, got ", gate_up_blocks.sizes());
  const int64_t inner = gate_up_blocks.size(0) / 2;
  check_blocks(op, "gate_up_blocks", gate_up_blocks, 2 * inner, width);
  check_blocks(op, "down_blocks", down_blocks, width, inner);

  const at::Tensor mixed = add_rows(hidden, q4_1_matmul(attention.reshape({1, heads_width}).contiguous(), o_blocks));
  const at::Tensor x = rms_norm(mixed, norm_weight, eps);
  const at::Tensor gate_up = q4_1_matmul(x.view({1, width}), gate_up_blocks);  // [1, 2 I]: gate | up
  const at::Tensor gate = at::silu(gate_up.narrow(1, 0, inner).view({1, 1, inner}));
  at::Tensor gated = at::empty({1, inner}, gate_up.options());
  const float* g = gate.data_ptr<float>();
  const float* u = gate_up.data_ptr<float>() + inner;
  float* gp = gated.data_ptr<float>();
  for (int64_t i = 0; i < inner; ++i) gp[i] = g[i] * u[i];
  return add_rows(mixed, q4_1_matmul(gated, down_blocks));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(infmllm, m) {
  m.def("decode_qkv(Tensor hidden, Tensor norm_weight, float eps, Tensor qkv_blocks, int q_heads, int kv_heads, "
        "Tensor cos, Tensor sin) -> (Tensor, Tensor, Tensor)");
  m.def("decode_mlp(Tensor hidden, Tensor attention, Tensor o_blocks, Tensor norm_weight, float eps, "
        "Tensor gate_up_blocks, Tensor down_blocks) -> Tensor");
}
TORCH_LIBRARY_IMPL(infmllm, CPU, m) {
  m.impl("decode_qkv", &decode_qkv);
  m.impl("decode_mlp", &decode_mlp);
}
// Inference only, as the products they call.
TORCH_LIBRARY_IMPL(infmllm, Autograd, m) {
  m.impl("decode_qkv", torch::autograd::autogradNotImplementedFallback());
  m.impl("decode_mlp", torch::autograd::autogradNotImplementedFallback());
}
