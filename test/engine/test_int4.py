"""int4 weights (engine/int4.py): the GGUF's own Q4_1 blocks through our q4_1 kernel or torch's int4 kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from infmllm_ros.engine import Chunk, LoadedModel, Stream, StreamConfig
from infmllm_ros.engine.int4 import (GROUP_SIZE, INT4_MAX_ROWS, Float16Head, Int4Linear, Q8_0Head, _torch_int4_available,
                                     float_weights, int4_kernel_available, quantize_int4,
                                     resolve_int4_kernel)
from infmllm_ros.engine.kernels import cpu_kernels_status
from infmllm_ros.engine.models import check_quantize, quantize_model

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="no int4 kernel runs here")


@pytest.fixture(params=["q4_1", "torch"])
def kernel(request) -> str:
    """Each int4 kernel in turn, skipped with its reason where it cannot run."""
    if request.param == "q4_1" and not cpu_kernels_status()[0]:
        pytest.skip(f"the q4_1 kernel cannot run here: {cpu_kernels_status()[1]}")
    if request.param == "torch" and not _torch_int4_available():
        pytest.skip(f"torch {torch.__version__} has no int4 CPU kernel")
    return request.param


def _q4_1_reference(linear: torch.nn.Linear, x: torch.Tensor, q8_0: bool = False) -> torch.Tensor:
    """What the q4_1 kernel computes, in float64, for a weight on a Q4_1 grid (``w = d q + m``, each block's
    smallest weight ``m``): ``d q`` times the activations with each block of 32 rounded to int16
    (``x ~= dx * xq``, ``dx = max|x| / 32767``), plus ``m`` times the block's unrounded sum, plus the bias.
    With ``q8_0`` (``w = d q``, no ``m``), what the q8_0 kernel computes."""
    weight = linear.weight.detach().double()
    lows = weight.view(weight.shape[0], -1, GROUP_SIZE).amin(-1, keepdim=True).expand(-1, -1, GROUP_SIZE)
    lows = lows * (not q8_0)
    lows = lows.reshape(weight.shape)
    blocks = x.double().reshape(-1, x.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    dx = blocks.abs().amax(-1, keepdim=True) / 32767
    rounded = (torch.round(blocks / torch.where(dx > 0, dx, 1.0)) * dx).reshape(-1, x.shape[-1])
    y = rounded @ (weight - lows).t() + x.double().reshape(-1, x.shape[-1]) @ lows.t()
    return (y if linear.bias is None else y + linear.bias.double()).view(*x.shape[:-1], -1)


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


def test_weights_on_a_q4_1_grid_are_kept_exactly_and_multiply_as_the_float_layer(kernel):
    linear, _ = _q4_1_linear()
    int4 = Int4Linear(linear, kernel)
    assert int4.kernel == kernel and int4.grid_error == 0.0  # the integers and float32 scales rebuild every weight
    x = torch.randn(2, INT4_MAX_ROWS // 2, 128)  # few rows: the int4 kernel
    got = int4(x)
    assert got.shape == (2, INT4_MAX_ROWS // 2, 96) and got.dtype == torch.float32
    if kernel == "q4_1":
        # the file's fp16 d and m: the very weights; only the activations' int16 rounding is left
        assert int4.max_error == int4.max_error_steps == 0.0 and int4.lossless
        torch.testing.assert_close(got.double(), _q4_1_reference(linear, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, linear(x), rtol=1e-4, atol=1e-4)  # (torch's kernel is ~1e-2 off)
    else:
        assert 0 < int4.max_error_steps < 0.05 and int4.lossless  # the kernel's bfloat16 scale and zero
        # bfloat16 activations, per-block scale and zero: within a percent of the float product
        torch.testing.assert_close(got, linear(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_the_q4_1_kernel_is_finer_than_torchs_and_auto_takes_it():
    if not (cpu_kernels_status()[0] and _torch_int4_available()):
        pytest.skip("needs both kernels")
    assert resolve_int4_kernel("auto") == "q4_1" and Int4Linear(torch.nn.Linear(64, 16)).kernel == "q4_1"
    linear, _ = _q4_1_linear(out_features=256, in_features=576)
    x = torch.randn(1, 576)
    exact = linear(x).double()
    ours = (Int4Linear(linear, "q4_1")(x).double() - exact).abs().max()
    theirs = (Int4Linear(linear, "torch")(x).double() - exact).abs().max()
    assert ours * 50 < theirs, (float(ours), float(theirs))


def test_the_q4_1_kernel_refuses_bad_tensors_and_gives_nan_for_non_finite_rows():
    if not cpu_kernels_status()[0]:
        pytest.skip(f"the q4_1 kernel cannot run here: {cpu_kernels_status()[1]}")
    linear, _ = _q4_1_linear()
    int4 = Int4Linear(linear, "q4_1")
    op = torch.ops.infmllm.q4_1_matmul
    x = torch.randn(3, 128)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), int4.blocks)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(128, 3).t(), int4.blocks)
    with pytest.raises(RuntimeError, match="the blocks cover 128"):
        op(torch.randn(3, 96), int4.blocks)
    with pytest.raises(RuntimeError, match="uint8"):
        op(x, int4.blocks.float())
    assert op(torch.empty(0, 128), int4.blocks).shape == (0, 96)
    huge = torch.full((1, 128), 3e38)  # finite, with a block sum beyond float32: a finite (or inf) product, not NaN
    assert not torch.isnan(int4(huge)).any()
    zero_block = torch.cat([torch.full((1, 32), 3e38), torch.zeros(1, 96)], 1)
    assert not torch.isnan(int4(zero_block)).any()
    # past 1e20 a row is summed in double: still the product, to the activations' rounding (at most 1/65534 of
    # a block's largest value per element), measured against the terms' size: an output that cancels to near
    # zero holds no relative precision (unseeded, a relative tolerance failed about one run in 30)
    large = torch.randn(2, 128, generator=torch.Generator().manual_seed(1)) * 1e30
    terms = large.abs().double() @ linear.weight.abs().double().t()
    assert ((int4(large).double() - _q4_1_reference(linear, large)).abs() <= 1e-4 * terms).all()
    x[1, 5], x[2, 100] = float("nan"), float("inf")
    y = int4(x)
    assert torch.isnan(y[1:]).all()  # not a silently finite answer from a NaN/inf activation
    torch.testing.assert_close(y[0].double(), _q4_1_reference(linear, x[:1])[0], rtol=1e-5, atol=1e-5)
    unbiased = torch.nn.Linear(128, 96, bias=False)
    with torch.no_grad():
        unbiased.weight.copy_(linear.weight)
    tiny = torch.randn(1, 128) * 1e-36  # 32767 / max|x| overflows float32 (the kernel scales in double);
    # the products are float32 subnormals, which hold fewer bits
    torch.testing.assert_close(Int4Linear(unbiased, "q4_1")(tiny), unbiased(tiny), rtol=1e-2, atol=1e-38)
    torch.library.opcheck(op, (torch.randn(2, 128), int4.blocks))  # what torch.compile is told matches the op


@pytest.mark.parametrize("threads", [1, 2])
def test_the_block_kernels_give_each_output_the_same_bits_however_many_rows_share_a_pass(threads):
    """The kernels take four weight rows a pass (and prefetch the next four): each output must still be the
    one-row sum, in the same order, for any output count (tails of 1-3 rows), row kind and thread split."""
    if not cpu_kernels_status()[0]:
        pytest.skip(f"the block kernels cannot run here: {cpu_kernels_status()[1]}")
    linear, _ = _q4_1_linear(out_features=96, in_features=160, seed=3)
    blocks = Int4Linear(linear, "q4_1").blocks[:93]  # the ops take any row count
    x = torch.randn(4, 160, generator=torch.Generator().manual_seed(4))
    x[1] *= 1e25  # a huge row: summed in double
    x[2, 7] = float("nan")
    head = torch.randint(-127, 128, (37, 5, 34), dtype=torch.int16).to(torch.uint8)  # int8 q as bytes
    head[..., :2] = torch.tensor([0x00, 0x2C], dtype=torch.uint8)  # fp16 d = 0.0625
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for op, weights in ((torch.ops.infmllm.q4_1_matmul, blocks), (torch.ops.infmllm.q8_0_matmul, head)):
            together = op(x, weights)
            one_by_one = torch.cat([op(x, weights[n:n + 1]) for n in range(weights.shape[0])], 1)
            torch.testing.assert_close(together, one_by_one, rtol=0, atol=0, equal_nan=True)
            assert torch.isnan(together[2]).all() and torch.isfinite(together[[0, 1, 3]]).all()
    finally:
        torch.set_num_threads(previous)


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


def test_a_constant_block_and_a_block_far_from_zero(kernel):
    """What the kernel's scales cannot hold: ``auto`` (lossless_only) leaves such a model alone."""
    constant = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        constant.weight.fill_(0.01)
    int4 = Int4Linear(constant, kernel)
    x = torch.ones(1, 64)
    torch.testing.assert_close(int4(x), constant(x), rtol=1e-2, atol=0)  # was 0.0 with a unit scale
    assert int4.grid_error == 0.0 and not int4.lossless  # 0.01 is neither a bfloat16 nor a float16 number
    zero = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        zero.weight.zero_()  # pruned weights: exact in any precision
    int4 = Int4Linear(zero, kernel)
    assert int4.max_error_steps == 0.0 and int4.lossless and not int4(x).any()
    far = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():  # an exact Q4_1 grid: fp16 d = 0.001, m = 0.3
        q = torch.randint(0, 16, (16, 2, GROUP_SIZE)).float()
        q[..., 0], q[..., 1] = 0, 15
        far.weight.copy_((q * torch.tensor(0.001).half().float() + torch.tensor(0.3).half().float()).view(16, 64))
    int4 = Int4Linear(far, kernel)
    assert int4.grid_error < 1e-6
    if kernel == "torch":  # bfloat16's 8 bits cannot hold m + 8 d that far from zero
        assert int4.max_error_steps > 0.25 and not int4.lossless
        model = torch.nn.Sequential(_q4_1_linear()[0], far)
        assert quantize_int4(model, lossless_only=True, kernel="torch") == []
        assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Linear]
    else:  # the file's fp16 d and m are q4_1's own
        assert int4.max_error_steps == 0.0 and int4.lossless
    huge = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():  # float16 overflows past 65504
        huge.weight.copy_(far.weight * 1e6)
    if kernel == "q4_1":
        with pytest.raises(ValueError, match="do not fit its float16"):
            Int4Linear(huge, "q4_1")
    model = torch.nn.Sequential(_q4_1_linear()[0], huge)
    assert quantize_int4(model, lossless_only=True, kernel=kernel) == []
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Linear]


def test_auto_takes_for_each_layer_the_kernel_that_holds_its_weights():
    if not (cpu_kernels_status()[0] and _torch_int4_available()):
        pytest.skip("needs both kernels")
    huge = torch.nn.Linear(64, 16)
    with torch.no_grad():
        huge.weight.mul_(1e6)  # beyond float16: bfloat16 scales (torch's kernel), not inf
    int4 = Int4Linear(huge)
    assert int4.kernel == "torch" and torch.isfinite(int4(torch.randn(1, 64))).all()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), huge)
    quantize_int4(model)
    assert [m.kernel for m in model] == ["q4_1", "torch"]
    x = torch.randn(1, 64)
    assert all(torch.equal(a, b) for a, b in zip(Int4Linear.forward_siblings(tuple(model), x), (model[0](x), model[1](x))))
    with pytest.raises(ValueError, match="one of"):
        Int4Linear(torch.nn.Linear(64, 16), "int3")
    tiny = torch.nn.Linear(64, 16)
    with torch.no_grad():
        tiny.weight.mul_(1e-5)  # float16 scales go subnormal: they would move weights by steps
    assert Int4Linear(tiny).kernel == "torch"
    with pytest.raises(ValueError, match="do not fit its float16"):
        Int4Linear(tiny, "q4_1")


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


def test_inputs_as_nn_linear_takes_them(kernel):
    linear = torch.nn.Linear(64, 32)
    int4 = Int4Linear(linear, kernel)
    strided = torch.randn(64, 3).t()  # not contiguous
    torch.testing.assert_close(int4(strided), int4(strided.contiguous()), rtol=0, atol=0)
    half = Int4Linear(torch.nn.Linear(64, 32).half(), kernel)
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
    # q, k, v, o, gate, up, down per layer
    assert len(int4_layers) == 7 * smollm2.model.config.num_hidden_layers
    # the LM head (Q8_0 in the file) keeps its blocks where the q4_1 kernels run, else a float16 copy
    assert isinstance(model.lm_head, Q8_0Head if cpu_kernels_status()[0] else Float16Head)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert max(m.grid_error for m in int4_layers) == 0.0  # the file's own integers
    if all(m.kernel == "q4_1" for m in int4_layers):
        assert max(m.max_error_steps for m in int4_layers) == 0.0  # the file's fp16 d and m as well
    assert max(m.max_error_steps for m in int4_layers) < 0.1  # torch's bfloat16 scales: 0.046 of a step at most
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


def _q8_0_linear(out_features=64, in_features=128, seed=0) -> torch.nn.Linear:
    """A bias-free Linear whose weight lies on a Q8_0 grid as llama.cpp makes it: int8 q, fp16 d per block."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(out_features, in_features // GROUP_SIZE, GROUP_SIZE, generator=g) * 0.05
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_((torch.round(blocks / d).clamp(-127, 127) * d).view(out_features, in_features))
    return linear


def test_a_head_on_a_q8_0_grid_keeps_its_blocks_and_other_heads_take_float16():
    if not cpu_kernels_status()[0]:
        pytest.skip(f"the q4_1 kernels cannot run here: {cpu_kernels_status()[1]}")
    linear = _q8_0_linear()
    head = Q8_0Head(linear)
    assert head.weight is linear.weight and head.blocks.shape == (64, 4, 34)
    x = torch.randn(3, 128)
    torch.testing.assert_close(head(x).double(), _q4_1_reference(linear, x, q8_0=True), rtol=1e-5, atol=1e-5)
    many = torch.randn(INT4_MAX_ROWS + 1, 128)
    torch.testing.assert_close(head(many), linear(many), rtol=0, atol=0)  # a whole chunk: the float weight
    bad = x.clone()
    bad[1, 3] = float("nan")
    assert torch.isnan(head(bad)[1]).all() and torch.isfinite(head(bad)[[0, 2]]).all()
    with pytest.raises(ValueError, match="not on a Q8_0 grid"):
        Q8_0Head(torch.nn.Linear(128, 64))
    with pytest.raises(RuntimeError, match="34\\] uint8"):
        torch.ops.infmllm.q8_0_matmul(x, head.blocks[..., :20].contiguous())
    model = _TinyLM()
    with torch.no_grad():
        model.lm_head.weight.copy_(_q8_0_linear(48, 64).weight)  # tied: the embeddings too
    assert quantize_int4(model) == ["layers.0", "layers.1", "lm_head"] and isinstance(model.lm_head, Q8_0Head)
    model = _TinyLM()
    with torch.no_grad():
        model.lm_head.weight.copy_(_q8_0_linear(48, 64).weight)
    quantize_int4(model, kernel="torch")  # torch's kernel asked for: the float16 copy, as before
    assert isinstance(model.lm_head, Float16Head)
    torch.library.opcheck(torch.ops.infmllm.q8_0_matmul, (x, head.blocks))


def test_joined_blocks_are_each_layers_own_rows_in_one_tensor_without_a_copy():
    if not cpu_kernels_status()[0]:
        pytest.skip(f"the q4_1 kernel cannot run here: {cpu_kernels_status()[1]}")
    torch.manual_seed(0)
    layers = [Int4Linear(torch.nn.Linear(64, n), "q4_1") for n in (32, 16, 48)]
    x = torch.randn(1, 64)
    alone = [layer(x) for layer in layers]
    before = [layer.blocks.clone() for layer in layers]
    joined = Int4Linear.joined_blocks(layers)
    assert joined.shape == (96, 2, 20) and torch.equal(joined, torch.cat(before))
    start = 0
    for layer, blocks in zip(layers, before):  # each layer's blocks are now its rows of the one tensor
        assert torch.equal(layer.blocks, blocks)
        assert layer.blocks.data_ptr() == joined.data_ptr() + start * 2 * 20
        start += blocks.shape[0]
    # one product over the joined rows gives each layer's outputs, bit for bit (biases aside: none here)
    together = torch.ops.infmllm.q4_1_matmul(x, joined)
    bias = torch.cat([layer.bias for layer in layers])
    assert torch.equal(together + bias, torch.cat(alone, -1))
    again = Int4Linear.joined_blocks(layers)  # found joined: the same memory, nothing moved
    assert again.data_ptr() == joined.data_ptr() and torch.equal(again, joined)
    assert all(torch.equal(layer(x), y) for layer, y in zip(layers, alone))
    with pytest.raises(ValueError, match="read different inputs"):
        Int4Linear.joined_blocks((layers[0], Int4Linear(torch.nn.Linear(32, 16), "q4_1")))
    with pytest.raises(ValueError, match="q4_1 kernel"):
        Int4Linear.joined_blocks(())
