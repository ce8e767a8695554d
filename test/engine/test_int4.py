"""int4 weights (engine/int4.py): the GGUF's own Q4_1 blocks through torch's int4 CPU kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from infmllm_ros.engine import Chunk, LoadedModel, Stream, StreamConfig
from infmllm_ros.engine.int4 import (GROUP_SIZE, INT4_MAX_ROWS, Float16Head, Int4Linear, float_weights,
                                     int4_kernel_available, quantize_int4)
from infmllm_ros.engine.models import check_quantize, quantize_model

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason=f"torch {torch.__version__} has no int4 CPU kernel")


def _q4_1_linear(out_features=96, in_features=128, seed=0) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A Linear whose weight lies on a Q4_1 grid made as llama.cpp makes it: fp16 d and m per block."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(out_features, in_features // GROUP_SIZE, GROUP_SIZE, generator=g) * 0.05
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = ((high - low) / 15).half().float()
    m = low.half().float()
    q = torch.round((blocks - m) / d).clamp(0, 15)
    q[..., 0], q[..., 1] = 0, 15  # as in a real block: its smallest weight is q = 0, its largest q = 15
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.copy_((q * d + m).view(out_features, in_features))
        linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear, q.view(out_features, in_features)


def test_weights_on_a_q4_1_grid_are_kept_exactly_and_multiply_as_the_float_layer():
    linear, _ = _q4_1_linear()
    int4 = Int4Linear(linear)
    assert int4.grid_error == 0.0  # the integers and float32 scales rebuild every weight
    assert 0 < int4.max_error_steps < 0.05 and int4.lossless  # the kernel's bfloat16 scale and zero
    x = torch.randn(2, INT4_MAX_ROWS // 2, 128)  # few rows: the int4 kernel
    expected = linear(x.bfloat16().float())  # the kernel reads the activations in bfloat16
    got = int4(x)
    assert got.shape == (2, INT4_MAX_ROWS // 2, 96) and got.dtype == torch.float32
    # bfloat16 per-block scale and zero: within a percent of the float product
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_more_rows_than_decode_uses_go_through_the_float_weight():
    linear, _ = _q4_1_linear()
    int4 = Int4Linear(linear)
    x = torch.randn(INT4_MAX_ROWS + 1, 128)
    torch.testing.assert_close(int4(x), linear(x), rtol=0, atol=0)  # prefill chunks: the float product
    assert not torch.equal(int4(x[:1]), linear(x[:1]))  # one row (decode): the 4-bit kernel
    with float_weights(int4):  # the float model, for comparisons
        torch.testing.assert_close(int4(x[:1]), linear(x[:1]), rtol=0, atol=0)
    assert not torch.equal(int4(x[:1]), linear(x[:1]))  # and back


def test_weights_off_the_grid_are_rounded_to_within_half_a_step():
    linear = torch.nn.Linear(64, 32, bias=False)
    int4 = Int4Linear(linear)
    blocks = linear.weight.detach().view(32, 2, GROUP_SIZE)
    step = (blocks.amax(-1) - blocks.amin(-1)) / 15
    assert 0 < int4.grid_error <= float(step.max()) / 2 + 1e-6


def test_a_width_the_blocks_do_not_divide_is_refused_and_skipped():
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear(torch.nn.Linear(40, 16))
    with pytest.raises(ValueError, match="out_features by 16"):
        Int4Linear(torch.nn.Linear(32, 7))  # the kernel packs output rows in tiles of 16
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 32))
    assert quantize_int4(net) == ["0"]  # the others stay float


def test_a_constant_block_and_a_block_far_from_zero():
    """What bfloat16 scale and zero cannot hold: ``auto`` (lossless_only) leaves such a model alone."""
    constant = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        constant.weight.fill_(0.01)
    int4 = Int4Linear(constant)
    x = torch.ones(1, 64)
    torch.testing.assert_close(int4(x), constant(x), rtol=1e-2, atol=0)  # was 0.0 with a unit scale
    assert int4.grid_error == 0.0 and not int4.lossless  # 0.01 is not a bfloat16 number
    zero = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        zero.weight.zero_()  # pruned weights: exact in any precision
    int4 = Int4Linear(zero)
    assert int4.max_error_steps == 0.0 and int4.lossless and not int4(x).any()
    far = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():  # an exact Q4_1 grid: fp16 d = 0.001, m = 0.3
        q = torch.randint(0, 16, (16, 2, GROUP_SIZE)).float()
        q[..., 0], q[..., 1] = 0, 15
        far.weight.copy_((q * torch.tensor(0.001).half().float() + torch.tensor(0.3).half().float()).view(16, 64))
    int4 = Int4Linear(far)
    assert int4.grid_error < 1e-6 and int4.max_error_steps > 0.25 and not int4.lossless
    model = torch.nn.Sequential(_q4_1_linear()[0], far)
    assert quantize_int4(model, lossless_only=True) == []
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Linear]


def _failing_at(layer: str):
    """A ``skip`` for quantize_int4 that raises when it reaches ``layer``: a failure halfway."""
    def skip(name):
        if name == layer:
            raise RuntimeError("injected")
        return False
    return skip


def test_a_failure_halfway_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 32))
    before = list(model)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_int4(model, _failing_at("1"))
    assert list(model) == before


def test_inputs_as_nn_linear_takes_them():
    linear = torch.nn.Linear(64, 32)
    int4 = Int4Linear(linear)
    strided = torch.randn(64, 3).t()  # not contiguous
    torch.testing.assert_close(int4(strided), int4(strided.contiguous()), rtol=0, atol=0)
    half = Int4Linear(torch.nn.Linear(64, 32).half())
    assert half(torch.randn(2, 64).half()).dtype == torch.float16


@pytest.mark.parametrize("rows", [1, INT4_MAX_ROWS + 1])
def test_inputs_nn_linear_refuses_are_refused_alike_whatever_the_row_count(rows):
    """Integers came back as truncated integer "outputs", float64 passed at few rows only, a wrong
    width failed inside a reshape: each now meets nn.Linear's own error."""
    linear = torch.nn.Linear(64, 48)
    for layer in (Int4Linear(linear), Float16Head(linear)):
        with pytest.raises(RuntimeError, match="same dtype|dtype"):
            layer(torch.ones(rows, 64, dtype=torch.long))
        with pytest.raises(RuntimeError, match="same dtype|dtype"):
            layer(torch.ones(rows, 64, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            layer(torch.ones(rows, 38))


class _TinyLM(torch.nn.Module):
    """Two decoder-like Linears and a tied LM head, named as transformers names them."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(48, 64)
        self.layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        self.lm_head = torch.nn.Linear(64, 48, bias=False)
        self.lm_head.weight = self.embed.weight


def test_the_lm_head_multiplies_few_rows_in_float16_and_more_in_float32():
    linear = torch.nn.Linear(64, 48, bias=False)
    head = Float16Head(linear)
    assert head.weight is linear.weight and head.half_weight.dtype == torch.float16
    x = torch.randn(3, 64)
    got = head(x)
    assert got.dtype == torch.float32 and not torch.equal(got, linear(x))  # float16 products ...
    expected = (x.half().double() @ linear.weight.detach().half().double().t())
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=2e-3)  # ... rounded to float16 once
    many = torch.randn(INT4_MAX_ROWS + 1, 64)
    torch.testing.assert_close(head(many), linear(many), rtol=0, atol=0)  # logits of a whole chunk: float32
    with float_weights(head):
        torch.testing.assert_close(head(x), linear(x), rtol=0, atol=0)
    huge = torch.full((1, 64), 1e6)  # past float16's range: the float32 product, not inf
    assert torch.equal(head(huge), linear(huge)) and torch.isfinite(head(huge)).all()


def test_quantize_int4_gives_the_tied_lm_head_a_float16_copy_and_undoes_it_on_failure():
    model = _TinyLM()
    assert quantize_int4(model) == ["layers.0", "layers.1", "lm_head"]
    assert isinstance(model.lm_head, Float16Head) and model.lm_head.weight is model.embed.weight
    big = _TinyLM()
    with torch.no_grad():
        big.embed.weight[0, 0] = 1e5  # does not fit float16: the head stays float32
    assert quantize_int4(big) == ["layers.0", "layers.1"] and type(big.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="not all finite in float16"):
        Float16Head(big.lm_head)
    with pytest.raises(ValueError, match="float32 weights"):
        Float16Head(torch.nn.Linear(64, 48).half())
    failing = _TinyLM()
    before = dict(failing.named_children())
    with pytest.raises(RuntimeError, match="injected"):
        quantize_int4(failing, _failing_at("lm_head"))
    assert dict(failing.named_children()) == before and type(failing.layers[0]) is torch.nn.Linear
    untouched = _TinyLM()  # auto on weights off every 4-bit grid: nothing changes, the head neither
    assert quantize_int4(untouched, lossless_only=True) == [] and type(untouched.lm_head) is torch.nn.Linear


def test_int4_is_refused_off_the_cpu_before_anything_loads():
    with pytest.raises(ValueError, match="CPU only"):
        check_quantize("int4", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="runs on the CPU"):
        quantize_int4(torch.nn.Linear(64, 8, device="meta"))
    with pytest.raises(ValueError, match="unknown quantize method 'int2'"):
        check_quantize("int2", torch.device("cpu"), torch.float32)


@pytest.mark.model
def test_smollm2_keeps_its_gguf_blocks_and_its_perplexity(smollm2, emma_ids):
    """``auto`` takes int4 here: every decoder Linear of the Q4_1 GGUF comes back on its grid, and the same
    Inf-MLLM stream, fed in chunks small enough for the int4 kernel, scores the next tokens as
    the float32 model does."""
    model = quantize_model(copy.deepcopy(smollm2.model), "auto")
    int4_layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    # q, k, v, o, gate, up, down per layer; the LM head (Q8_0 in the file) gets a float16 copy
    assert len(int4_layers) == 7 * smollm2.model.config.num_hidden_layers
    assert isinstance(model.lm_head, Float16Head) and model.lm_head.weight is model.model.embed_tokens.weight
    assert max(m.grid_error for m in int4_layers) == 0.0  # the file's own integers
    assert max(m.max_error_steps for m in int4_layers) < 0.1  # bfloat16 scales: 0.046 of a step at most
    quantized = LoadedModel(model=model, tokenizer=smollm2.tokenizer, name=smollm2.name, quantize="int4")

    ids, step = emma_ids[:, :320], INT4_MAX_ROWS
    settings = dict(policy="infmllm", budget_tokens=128, max_chunk_tokens=step)

    def nll(lm):
        stream = Stream(lm, StreamConfig(**settings))
        stream._started = stream._in_user_turn = True
        try:
            logits = torch.cat([stream.append_chunk(Chunk(input_ids=ids[:, i:i + step]), return_logits=True).logits
                                for i in range(0, ids.shape[1], step)])  # [tokens, vocab]
        finally:
            stream.close()
        return float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])), logits

    float_nll, float_logits = nll(smollm2)
    int4_nll, int4_logits = nll(quantized)
    assert abs(int4_nll - float_nll) < 0.01 * float_nll
    agree = (int4_logits.argmax(-1) == float_logits.argmax(-1)).float().mean()
    assert agree >= 0.95, float(agree)


@pytest.mark.model
def test_quantize_model_int4_leaves_the_vision_tower_float_and_auto_leaves_random_weights(tiny_idefics3):
    model = copy.deepcopy(tiny_idefics3.model)
    layers = dict(model.named_modules())
    assert quantize_int4(model, lossless_only=True) == []  # random weights are off any 4-bit grid ...
    assert dict(model.named_modules()).keys() == layers.keys()
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), layers.values()))  # ... untouched
    quantize_model(model, "int4")
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Int4Linear))}
    assert any(k == "Int4Linear" for k in kinds.values())
    assert all(k == "Linear" for name, k in kinds.items() if "vision" in name)
    assert isinstance(model.lm_head, Float16Head)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = tiny_idefics3.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert got.shape == expected.shape and torch.isfinite(got).all()
