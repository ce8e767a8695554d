"""Our CPU kernels (engine/kernels.py, csrc/): the decode attention op and where the hook uses it.

(The int4 product ops are tested in test_int4.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infmllm_ros.engine import Chunk, StreamConfig, attention
from infmllm_ros.engine.kernels import cpu_kernels_status

pytestmark = pytest.mark.skipif(not cpu_kernels_status()[0],
                                reason=f"our CPU kernels cannot run here: {cpu_kernels_status()[1]}")


def _sdpa(q, k, v, scale):
    """transformers' sdpa attention output for one query token: ``[B, 1, Hq, D]``."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("batch,q_heads,kv_heads,tokens", [(1, 9, 3, 1096), (2, 4, 4, 7), (1, 8, 2, 8), (1, 3, 3, 1),
                                                         (1, 15, 5, 33), (1, 14, 2, 515)])  # G = 3, 1, 4, 1, 3, 7; L % 4 = 0-3
def test_decode_attention_is_sdpa_to_float32_rounding(batch, q_heads, kv_heads, tokens):
    torch.manual_seed(0)
    q = torch.randn(batch, q_heads, 1, 64) * 3
    # views into a larger cache, as the capped cache hands them over: rows strided by the capacity
    k = torch.randn(batch, kv_heads, tokens + 40, 64)[:, :, :tokens]
    v = torch.randn(batch, kv_heads, tokens + 40, 64)[:, :, :tokens]
    got = torch.ops.infmllm.decode_attention(q, k, v, 0.125)
    assert got.shape == (batch, 1, q_heads, 64)
    exact = _sdpa(q.double(), k.double(), v.double(), 0.125)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _sdpa(q, k, v, 0.125), rtol=1e-5, atol=1e-6)


def test_decode_attention_refuses_what_it_does_not_compute_and_keeps_nan():
    op = torch.ops.infmllm.decode_attention
    q, k = torch.randn(1, 6, 1, 64), torch.randn(1, 3, 10, 64)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), k.double(), 0.1)
    with pytest.raises(RuntimeError, match="one query token"):
        op(torch.randn(1, 6, 2, 64), k, k, 0.1)
    with pytest.raises(RuntimeError, match="head_dim must be 64"):
        op(torch.randn(1, 6, 1, 32), k[..., :32], k[..., :32], 0.1)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        op(torch.randn(1, 4, 1, 64), k, k, 0.1)
    with pytest.raises(RuntimeError, match="L >= 1"):
        op(q, k[:, :, :0], k[:, :, :0], 0.1)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 0.1)
    bad = k.clone()
    bad[0, 1, 4, 0] = float("nan")  # one key of the second KV head: its two query heads get NaN, as in sdpa
    out = op(q, bad, k, 0.1)
    assert torch.isnan(out[0, 0, 2:4]).all() and torch.isfinite(out[0, 0, :2]).all() and torch.isfinite(out[0, 0, 4:]).all()
    assert torch.isnan(_sdpa(q, bad, k, 0.1)[0, 0, 2:4]).all()
    torch.library.opcheck(op, (q, k, k, 0.1))


@pytest.fixture(scope="module")
def llama64(make_random_lm):
    """A random-weight Llama with head_dim 64 (4 heads of 256), 2 KV heads."""
    return make_random_lm("llama", "sdpa", hidden_size=256)


@pytest.mark.model
def test_a_stream_decodes_with_the_kernel_and_a_plain_call_keeps_sdpa(llama64):
    """Inside a stream's decode step the hook sends sdpa to the kernel; the same model called outside a
    stream step keeps torch's sdpa. The stream's logits stay those of the model with sdpa, to rounding."""
    from infmllm_ros.bench.common import raw_stream

    stream = raw_stream(llama64, StreamConfig(policy="full", budget_tokens=256))
    attn0 = llama64.model.model.layers[0].self_attn
    base = attn0._infmllm_base
    try:
        assert base.base is not None  # sdpa, wrapped
        calls = []

        def spy(*args, **kwargs):
            calls.append(attention.decode_kernel_applies(*args[1:5], kwargs))
            return base(*args, **kwargs)

        attn0._infmllm_base = spy
        torch.manual_seed(2)
        ids = torch.randint(100, 40000, (1, 12))
        stream.append_chunk(Chunk(input_ids=ids[:, :11]))  # a chunk: sdpa
        stream.cache.decoding = True
        logits = stream._decode_one(int(ids[0, 11]))  # a decode step: the kernel
        stream.cache.decoding = False
        assert calls == [False, True]
        with torch.no_grad():
            plain = llama64.model(input_ids=ids).logits[0, -1]  # outside a stream step: sdpa
        assert calls[2:] == [False]  # the plain call: through the hook, but no stream step is active
        torch.testing.assert_close(logits.flatten().float(), plain.float(), rtol=1e-4, atol=1e-4)
        assert not attention.decode_kernel_applies(torch.zeros(1, 4, 1, 64), torch.zeros(1, 4, 3, 64),
                                                    torch.zeros(1, 4, 3, 64), None, {})  # no stream step active
    finally:
        attn0._infmllm_base = base
        stream.close()


def test_decode_attention_gives_a_minus_infinite_score_no_weight_as_sdpa():
    q = torch.zeros(1, 1, 1, 64)
    q[..., 0] = 1e20
    k = torch.randn(1, 1, 5, 64)
    k[..., 0] = 0
    k[0, 0, 3, 0] = -1e20  # its score overflows to -inf: weight 0, the others as usual
    v = torch.randn(1, 1, 5, 64)
    torch.testing.assert_close(torch.ops.infmllm.decode_attention(q, k, v, 1.0), _sdpa(q, k, v, 1.0))
    k[0, 0, :, 0] = -1e20  # every score -inf: zeros, as torch's CPU sdpa gives
    assert torch.equal(_sdpa(q, k, v, 1.0), torch.zeros(1, 1, 1, 64))
    assert torch.equal(torch.ops.infmllm.decode_attention(q, k, v, 1.0), torch.zeros(1, 1, 1, 64))


def test_the_hook_keeps_sdpa_for_what_the_kernel_does_not_compute():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 9, 64)
    token = attention._ACTIVE.set(object())  # as inside a stream's step
    try:
        assert attention.decode_kernel_applies(q, k, k, None, {"dropout": 0.0, "scaling": 0.125,
                                                                "position_ids": None, "use_cache": True})
        for kwargs in ({"position_bias": torch.zeros(1, 4, 1, 9)}, {"softcap": 30.0}, {"sliding_window": 4},
                       {"s_aux": torch.zeros(4)}, {"dropout": 0.1}):
            assert not attention.decode_kernel_applies(q, k, k, None, kwargs), kwargs
        assert not attention.decode_kernel_applies(q, k, k, torch.zeros(1, 1, 1, 9), {})  # a mask
        assert not attention.decode_kernel_applies(q, k, torch.randn(1, 2, 9, 32), None, {})  # value head_dim
        assert not attention.decode_kernel_applies(q, torch.randn(2, 2, 9, 64), torch.randn(2, 2, 9, 64), None, {})
        assert not attention.decode_kernel_applies(q.half(), k.half(), k.half(), None, {})
        assert not attention.decode_kernel_applies(torch.randn(1, 4, 2, 64), k, k, None, {})  # a chunk
    finally:
        attention._ACTIVE.reset(token)


def test_the_kernels_refuse_a_backward_instead_of_a_silent_none():
    from infmllm_ros.engine.int4 import Int4Linear

    layer = Int4Linear(torch.nn.Linear(64, 16), "q4_1")
    x = torch.randn(1, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        layer(x).sum().backward()
    q = torch.randn(1, 2, 1, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.infmllm.decode_attention(q, torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64), 0.1).sum().backward()
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.ops.infmllm.window_column_sums(torch.randn(1, 2, 3, 64, requires_grad=True), torch.randn(1, 2, 3, 64),
                                             0.1, 0).sum().backward()


def _layer_inputs(width=64, heads=(4, 2), dim=16, inner=96):
    """Inputs of ``infmllm::decode_qkv`` / ``decode_mlp`` for a random layer (blocks joined as the step does)."""
    from infmllm_ros.engine.int4 import Int4Linear

    q_heads, kv_heads = heads
    torch.manual_seed(0)
    qkv = [Int4Linear(torch.nn.Linear(width, n * dim, bias=False), "q4_1") for n in (q_heads, kv_heads, kv_heads)]
    gate_up = [Int4Linear(torch.nn.Linear(width, inner, bias=False), "q4_1") for _ in range(2)]
    o = Int4Linear(torch.nn.Linear(q_heads * dim, width, bias=False), "q4_1")
    down = Int4Linear(torch.nn.Linear(inner, width, bias=False), "q4_1")
    return dict(hidden=torch.randn(1, 1, width), weight=torch.rand(width) + 0.5, qkv=Int4Linear.joined_blocks(qkv),
                gate_up=Int4Linear.joined_blocks(gate_up), o=o.blocks, down=down.blocks,
                cos=torch.randn(1, 1, 1, dim), sin=torch.randn(1, 1, 1, dim), heads=heads,
                attention=torch.randn(1, 1, q_heads, dim))


def test_the_layer_ops_refuse_what_they_do_not_compute_with_the_reason():
    qkv_op, mlp_op = torch.ops.infmllm.decode_qkv, torch.ops.infmllm.decode_mlp
    a = _layer_inputs()

    def qkv(**change):
        b = {**a, **change}
        return qkv_op(b["hidden"], b["weight"], 1e-5, b["qkv"], *b["heads"], b["cos"], b["sin"])

    def mlp(**change):
        b = {**a, **change}
        return mlp_op(b["hidden"], b["attention"], b["o"], b["weight"], 1e-5, b["gate_up"], b["down"])

    query, key, value = qkv()
    assert (query.shape, key.shape, value.shape) == ((1, 4, 1, 16), (1, 2, 1, 16), (1, 2, 1, 16))
    assert mlp().shape == (1, 1, 64) and torch.isfinite(mlp()).all()
    with pytest.raises(RuntimeError, match="hidden must be one contiguous float32 row of 64"):
        qkv(hidden=a["hidden"].double())
    with pytest.raises(RuntimeError, match=r"hidden must be \[1, 1, hidden\]"):
        mlp(hidden=torch.randn(1, 64))
    with pytest.raises(RuntimeError, match="norm_weight must be one contiguous float32 row of 64"):
        qkv(weight=torch.rand(32))
    with pytest.raises(RuntimeError, match="must be even"):
        qkv(cos=torch.randn(1, 1, 1, 15), sin=torch.randn(1, 1, 1, 15))
    with pytest.raises(RuntimeError, match=r"qkv_blocks must be \[96, 2, 20\] q4_1 blocks"):
        qkv(heads=(4, 1))
    with pytest.raises(RuntimeError, match="head counts must be positive and at most"):
        qkv(heads=(0, 2))
    with pytest.raises(RuntimeError, match="o_blocks must be"):
        mlp(attention=torch.randn(1, 1, 2, 16))
    with pytest.raises(RuntimeError, match="down_blocks must be"):
        mlp(down=a["o"])
    with pytest.raises(RuntimeError, match="not implemented"):
        mlp(hidden=a["hidden"].clone().requires_grad_()).sum().backward()


def _column_sums_torch(query, key, scaling, kv_groups, causal_offset):
    """What ``column_attention`` computes with torch's ops (float64): the reference for the kernel."""
    batch, q_heads, rows, _ = query.shape
    logits = torch.einsum("bhgnd,bhtd->bhgnt", (query.double() * scaling).view(batch, key.shape[1], kv_groups, rows, -1),
                          key.double())
    hidden = torch.arange(key.shape[2]).view(1, -1) > (causal_offset + torch.arange(rows)).view(-1, 1)
    return logits.masked_fill(hidden, float("-inf")).softmax(-1).sum(dim=(2, 3))


@pytest.mark.parametrize("rows,tokens,offset,heads", [(64, 1280, 1216, (9, 3)), (256, 300, 44, (9, 3)), (1, 9, 8, (4, 4)),
                                                      (7, 13, 2, (8, 2)), (5, 3, 0, (2, 1)), (33, 70, 100, (6, 3))])
def test_window_column_sums_is_the_softmax_summed_per_key(rows, tokens, offset, heads):
    """The scoring kernel gives each key the attention the queries pay it (causal: row i sees keys up to
    offset + i), summed over the rows and each KV head's query heads, to float32 rounding; a window at the
    end of the cache (Inf-MLLM), a whole chunk (H2O), one token, odd lengths, an offset past the keys."""
    from infmllm_ros.engine.cache import column_attention

    torch.manual_seed(0)
    q_heads, kv_heads = heads
    query = (torch.randn(1, q_heads, rows + 3, 64) * 3)[:, :, 3:]  # a view, as the window's queries are
    key = (torch.randn(1, kv_heads, tokens + 40, 64) * 3)[:, :, :tokens]  # rows strided by the capacity
    got = torch.ops.infmllm.window_column_sums(query, key, 0.125, offset)
    exact = _column_sums_torch(query, key, 0.125, q_heads // kv_heads, offset)
    assert got.shape == (1, kv_heads, tokens) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(column_attention(query, key, 0.125, q_heads // kv_heads, offset), got)
    # every row's probabilities sum to one: the sums of one KV head add up to its rows times its query heads
    torch.testing.assert_close(got.sum(-1), torch.full((1, kv_heads), float(rows * q_heads // kv_heads)))


def test_window_column_sums_refuses_what_it_does_not_compute_and_keeps_nan():
    op = torch.ops.infmllm.window_column_sums
    q, k = torch.randn(1, 6, 4, 64), torch.randn(1, 3, 10, 64)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), 0.1, 6)
    with pytest.raises(RuntimeError, match="4-D"):
        op(q[0], k, 0.1, 6)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        op(torch.randn(1, 4, 4, 64), k, 0.1, 6)
    with pytest.raises(RuntimeError, match="L >= 1"):
        op(q, k[:, :, :0], 0.1, 6)
    with pytest.raises(RuntimeError, match="q's B and d"):
        op(q, k[..., :32], 0.1, 6)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(q, k.transpose(2, 3).contiguous().transpose(2, 3), 0.1, 6)
    with pytest.raises(RuntimeError, match="causal_offset must be >= 0"):
        op(q, k, 0.1, -1)
    assert op(q[:, :, :0], k, 0.1, 6).eq(0).all()  # no rows: nothing paid
    bad = k.clone()
    bad[0, 1, 4, 0] = float("nan")  # one key of the second KV head: its sums are NaN (as a softmax's), the others not
    out = op(q, bad, 0.1, 6)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 2]).all()
    assert torch.isnan(_column_sums_torch(q, bad, 0.1, 2, 6)[0, 1]).all()
    # -inf scores, as torch's softmax takes them: one gets weight 0; a row whose visible scores are all -inf is NaN
    q1, k1 = torch.zeros(1, 1, 2, 4), torch.randn(1, 1, 6, 4)
    q1[..., 0] = 1.0
    k1[0, 0, 1, 0] = float("-inf")  # row 0 sees columns 0-1 (one -inf), row 1 columns 0-2
    torch.testing.assert_close(op(q1, k1, 1.0, 1), _column_sums_torch(q1, k1, 1.0, 1, 1).float())
    assert op(q1, k1, 1.0, 1)[0, 0, 1] == 0
    k1[0, 0, 0, 0] = float("-inf")  # now row 0 sees only -inf scores
    assert torch.isnan(op(q1, k1, 1.0, 0)).all() and torch.isnan(_column_sums_torch(q1, k1, 1.0, 1, 0)).all()
    # an offset past the keys shows them all, however large
    torch.testing.assert_close(op(q, k, 0.1, 2 ** 63 - 1), op(q, k, 0.1, 10))
    torch.library.opcheck(op, (q, k, 0.1, 6))
