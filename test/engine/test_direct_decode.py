"""The direct decode step (``DirectDecodeStep``) against the model's own forward: the same bits, every policy.

Random-weight models of the real transformers classes (Llama under sdpa and
eager attention, Qwen2 with its q/k/v biases) and the real SmolLM2 weights.
Two streams over one model see the same chunks and forced decode tokens;
one decodes through ``model(...)``, the other walks the layers directly.
"""

from __future__ import annotations

import functools

import pytest
import torch

from infmllm_ros.bench.common import raw_stream
from infmllm_ros.engine import Chunk, LoadedModel, Stream, StreamConfig
from infmllm_ros.engine.decode import DirectDecodeStep
from infmllm_ros.engine.int4 import Int4Linear, int4_kernel_available
from infmllm_ros.engine.kernels import cpu_kernels_status
from infmllm_ros.engine.models import quantize_model
from infmllm_ros.engine.policies import POLICIES

pytestmark = [pytest.mark.model]


@pytest.fixture(scope="module", params=[("llama", "sdpa", "none"), ("llama", "eager", "none"), ("llama64", "sdpa", "none"),
                                        ("qwen2", "sdpa", "none"), ("llama", "sdpa", "int4"),
                                        ("llama64", "sdpa", "int4"), ("qwen2", "sdpa", "int4")],
                ids=lambda p: "-".join(p))
def tiny_lm(request, make_random_lm):
    family, attn, quantize = request.param
    # llama64: head_dim 64, where a float32 decode step's attention goes to our kernel (test_kernels.py); in
    # int4 the direct step's C++ layer calls then call that kernel themselves
    lm = make_random_lm("llama" if family == "llama64" else family, attn, 256 if family == "llama64" else 64)
    model = lm.model
    if quantize != "none":
        if not int4_kernel_available(torch.device("cpu")):
            pytest.skip("this torch has no int4 CPU kernel")
        quantize_model(model, quantize)
        assert any(isinstance(m, Int4Linear) for m in model.modules())
    return LoadedModel(model=model, tokenizer=lm.tokenizer, name=f"tiny-{family}", quantize=quantize)


def _pair(lm, policy, make=raw_stream, **settings):
    """Two streams on one model: one walks the decoder directly, one goes through ``model(...)``."""
    direct, through_model = (make(lm, StreamConfig(policy=policy, **settings)) for _ in range(2))
    assert direct.decode_path == "direct", direct.direct_decode_unsupported
    # the step's shortcuts (norms inline, query and key rotated together) are what these tests compare
    assert direct._direct.inline_norms and direct._direct.fused_rope
    # and the C++ calls for a layer's arithmetic (csrc/decode_layer.cpp), where every projection is 4-bit
    # without biases (Llama in int4; Qwen2's q/k/v biases keep the Python path)
    joinable = lm.quantize == "int4" and "qwen2" not in lm.name and cpu_kernels_status()[0]
    assert [plan is not None for plan in direct._direct.joined] == ([True] * len(direct._direct.joined) if joinable
                                                                   else [False] * len(direct._direct.joined))
    through_model._direct = None
    assert through_model.decode_path == "model"
    return direct, through_model


def _assert_same_cache(a, b):
    assert a.stats() == b.stats()
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(la.held("keys"), lb.held("keys"))
        assert torch.equal(la.held("values"), lb.held("values"))
        for name in la.buffers:
            assert torch.equal(la.held(name), lb.held(name)), name


@pytest.mark.parametrize("policy", [*sorted(POLICIES), "infmllm-frames"])
def test_direct_decode_gives_the_models_bits_for_every_policy(tiny_lm, policy):
    torch.manual_seed(1)
    ids = torch.randint(100, 40000, (1, 160))
    budget = 512 if policy == "full" else 48  # full's budget is its capacity
    # infmllm-frames: frames ranked by carried scores (bias_frames=False: a bool frame flag beside the keys)
    frames = policy == "infmllm-frames"
    knobs = {"policy": "infmllm", "decay": 0.97, "bias_frames": False} if frames else {"policy": policy}
    streams = _pair(tiny_lm, budget_tokens=budget, max_chunk_tokens=16, recent=8, retrieval_window=8, **knobs)
    try:
        for round_ in range(2):
            for s in streams:
                for start in range(0, 64, 16):
                    kind = "frame" if frames and start % 32 == 0 else "text"
                    s.append_chunk(Chunk(input_ids=ids[:, 64 * round_ + start:64 * round_ + start + 16], kind=kind))
                s.cache.decoding = True
            # Forced tokens, so both see the same inputs whatever they would pick; 20 steps pass the
            # answer room (16), so Inf-MLLM evicts mid-answer too, and H2O/StreamingLLM at every step.
            for i in range(20):
                token = int(ids[0, 140 + i])
                got, expected = (s._decode_one(token) for s in streams)
                assert torch.equal(got, expected), f"step {i}: max diff {(got - expected).abs().max()}"
            for s in streams:
                s.cache.decoding = False
            _assert_same_cache(*streams)
        assert streams[0].cache.evictions > 0 or policy == "full"
        if frames:
            flags = streams[0].cache.layers[0].held("frame")
            assert flags.any() and not flags.all()
    finally:
        for s in streams:
            s.close()


def test_direct_decode_answers_like_the_model_on_real_weights(smollm2, emma_ids):
    streams = _pair(smollm2, "infmllm", make=Stream, budget_tokens=256, max_chunk_tokens=64)
    try:
        answers = []
        for s in streams:
            for start in range(0, 512, 64):
                s.append_text(smollm2.tokenizer.decode(emma_ids[0, start:start + 64]))
            answers.append(s.ask("Who is the story about?", max_new_tokens=24))
        assert answers[0].text == answers[1].text and answers[0].generated_tokens == answers[1].generated_tokens
        _assert_same_cache(*streams)
    finally:
        for s in streams:
            s.close()


def test_models_the_direct_step_cannot_walk_keep_their_forward(make_random_lm, tiny_qwen25vl, tiny_idefics3):
    sliding = make_random_lm("qwen2", "sdpa", use_sliding_window=True, sliding_window=32, max_window_layers=0).model
    assert "sliding-window" in DirectDecodeStep.unsupported(sliding)
    with pytest.raises(ValueError, match="no direct decode step"):
        DirectDecodeStep(sliding)
    # Before a stream installs its attention hook, the step has no attention function to call.
    assert "hook" in DirectDecodeStep.unsupported(make_random_lm().model)
    for vlm in (tiny_qwen25vl, tiny_idefics3):
        s = Stream(vlm, StreamConfig(policy="infmllm", budget_tokens=512))
        try:
            assert s.decode_path == "model" and s.direct_decode_unsupported
            s.append_text("a line of text to read")
            assert s.ask("What was read?", max_new_tokens=4).generated_tokens >= 1
        finally:
            s.close()


@pytest.mark.parametrize("where", ["mlp", "norm"])
def test_hooks_on_the_model_send_steps_through_its_forward(smollm2, where):
    streams = _pair(smollm2, "infmllm", make=Stream, budget_tokens=256, max_chunk_tokens=64)
    try:
        for s in streams:
            s.append_text("12:00:01 kitchen: 2 people, left")
        # A hook on a module the direct step does not call itself (one layer's MLP; a norm, whose arithmetic
        # the step does inline) must run.
        layer = smollm2.model.model.layers[3]
        module = layer.mlp if where == "mlp" else layer.post_attention_layernorm
        calls = []
        hook = module.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
        try:
            snapshots = [s.snapshot() for s in streams]
            got, expected = (s._decode_one(200) for s in streams)
            assert torch.equal(got, expected) and len(calls) == 2
        finally:
            hook.remove()
        for s, snap in zip(streams, snapshots):
            s.restore(snap)
        unhooked = streams[0]._decode_one(200)
        assert not torch.equal(unhooked, got) and len(calls) == 2  # gone again: the direct step is back
        assert torch.equal(unhooked, streams[1]._decode_one(200))
    finally:
        for s in streams:
            s.close()


def test_modules_replaced_after_the_stream_is_built_are_the_ones_the_step_uses(smollm2):
    # An adapter injected or a norm's forward replaced once the stream exists (found by a review: the step
    # had looked its modules up once and kept inlining a norm whose forward had changed).
    streams = _pair(smollm2, "infmllm", make=Stream, budget_tokens=256, max_chunk_tokens=64)
    attn = smollm2.model.model.layers[2].self_attn
    norm = smollm2.model.model.norm
    q_proj = attn.q_proj
    try:
        for s in streams:
            s.append_text("12:00:01 kitchen: 2 people, left")
        snapshots = [s.snapshot() for s in streams]
        scaled = torch.nn.Linear(q_proj.in_features, q_proj.out_features, bias=q_proj.bias is not None)
        with torch.no_grad():
            scaled.weight.copy_(q_proj.weight * 1.1)
        attn.q_proj = scaled
        norm.forward = lambda x, _f=type(norm).forward: _f(norm, x) * 1.5
        got, expected = (s._decode_one(201) for s in streams)
        assert torch.equal(got, expected)
        attn.q_proj = q_proj
        del norm.forward
        for s, snap in zip(streams, snapshots):
            s.restore(snap)
        unchanged = streams[0]._decode_one(201)
        assert not torch.equal(unchanged, got) and torch.equal(unchanged, streams[1]._decode_one(201))
    finally:
        attn.q_proj = q_proj
        norm.__dict__.pop("forward", None)
        for s in streams:
            s.close()


def test_a_norm_or_rotation_the_step_does_not_know_is_called_not_inlined(smollm2):
    # A norm whose arithmetic differs from Llama's RMSNorm (here: its forward replaced on the instance) is
    # called as a module; the step still gives the model's bits.
    streams = _pair(smollm2, "infmllm", make=Stream, budget_tokens=256, max_chunk_tokens=64)
    norm = smollm2.model.model.norm
    norm.forward = lambda x, _f=type(norm).forward: _f(norm, x) * 1.5
    try:
        step = DirectDecodeStep(smollm2.model)
        assert not step.inline_norms and step.fused_rope
        streams[0]._direct = step
        for s in streams:
            s.append_text("12:00:01 kitchen: 2 people, left")
        got, expected = (s._decode_one(200) for s in streams)
        assert torch.equal(got, expected)
    finally:
        del norm.forward
        for s in streams:
            s.close()


def test_a_closed_stream_refuses_to_run_on_either_path(smollm2):
    for direct in (True, False):
        s = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=256, max_chunk_tokens=64))
        if not direct:
            s._direct = None
        s.append_text("a line")
        s.close()
        with pytest.raises(RuntimeError, match="stream is closed"):
            s.ask("What?", max_new_tokens=4)
        with pytest.raises(RuntimeError, match="stream is closed"):
            s.append_text("another line")


def test_int4_siblings_give_each_layers_own_result(smollm2):
    if not int4_kernel_available(torch.device("cpu")):
        pytest.skip("this torch has no int4 CPU kernel")
    torch.manual_seed(0)
    q, k = Int4Linear(torch.nn.Linear(64, 32)), Int4Linear(torch.nn.Linear(64, 16, bias=False))
    x = torch.randn(1, 1, 64)
    assert all(torch.equal(a, b) for a, b in zip(Int4Linear.forward_siblings((q, k), x), (q(x), k(x))))
    assert Int4Linear.forward_siblings((), x) == ()

    class Doubled(Int4Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(torch.nn.Linear(64, 16))
    assert torch.equal(Int4Linear.forward_siblings((q, doubled), x)[1], doubled(x))
    hook = k.register_forward_hook(lambda m, i, o: o + 1)
    try:
        assert torch.equal(Int4Linear.forward_siblings((q, k), x)[1], k(x))
    finally:
        hook.remove()
    # a forward replaced on an instance is called too (found by a review: it was bypassed)
    k.forward = lambda x, _f=k.forward: _f(x) + 1
    try:
        assert torch.equal(Int4Linear.forward_siblings((q, k), x)[1], k(x))
    finally:
        del k.forward


def test_the_layer_calls_follow_replaced_projections_float_weights_and_hooks(make_random_lm):
    # The C++ calls (csrc/decode_layer.cpp) take a layer's modules as planned when the stream was built; a
    # projection replaced since, float weights asked for, or a hook on a projection must still give the
    # model's bits (the plan is checked at every step).
    if not cpu_kernels_status()[0]:
        pytest.skip(f"our CPU kernels cannot run here: {cpu_kernels_status()[1]}")
    from infmllm_ros.engine.int4 import float_weights

    random_lm = make_random_lm("llama", "sdpa", 256)
    quantize_model(random_lm.model, "int4")
    lm = LoadedModel(model=random_lm.model, tokenizer=random_lm.tokenizer, name="tiny-llama-int4", quantize="int4")
    streams = _pair(lm, "infmllm", budget_tokens=48, max_chunk_tokens=16, recent=8, retrieval_window=8)
    attn = lm.model.model.layers[1].self_attn
    q_proj = attn.q_proj
    try:
        torch.manual_seed(2)
        ids = torch.randint(100, 40000, (1, 32))
        for s in streams:
            s.append_chunk(Chunk(input_ids=ids[:, :16]))
            s.append_chunk(Chunk(input_ids=ids[:, 16:]))
        snapshots = [s.snapshot() for s in streams]

        def step(token=300):
            for s, snap in zip(streams, snapshots):
                s.restore(snap)
            got, expected = (s._decode_one(token) for s in streams)
            assert torch.equal(got, expected), f"max diff {(got - expected).abs().max()}"
            return got

        planned = step()
        scaled = torch.nn.Linear(q_proj.in_features, q_proj.out_features, bias=False)
        with torch.no_grad():
            scaled.weight.copy_(q_proj.weight * 1.1)
        attn.q_proj = Int4Linear(scaled, "q4_1")
        assert not torch.equal(step(), planned)
        attn.q_proj = q_proj
        assert torch.equal(step(), planned)  # the planned layer again
        with float_weights(lm.model):
            assert not torch.equal(step(), planned)
        calls = []
        hook = lm.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
        try:
            assert not torch.equal(step(), planned) and len(calls) == 2
        finally:
            hook.remove()
        assert torch.equal(step(), planned)
        # Found by a review: a forward replaced on one projection, a bias added, a norm made float16, blocks
        # moved under the same buffer (``.data``) were not seen by the plan.
        o_proj, norm = attn.o_proj, lm.model.model.layers[0].input_layernorm
        o_proj.forward = lambda x, _f=o_proj.forward: _f(x) * 1.5
        assert not torch.equal(step(), planned)
        del o_proj.forward
        o_proj.bias = torch.nn.Parameter(torch.full((o_proj.out_features,), 0.25))
        assert not torch.equal(step(), planned)
        del o_proj.bias
        o_proj.bias = None
        norm.half()
        step()  # float16 norm weights (a random Llama's are ones): no error, the model's bits
        norm.float()
        kept = q_proj.blocks.data
        q_proj.blocks.data = kept.clone()
        q_proj.blocks.data[..., 4:] = 0  # every q weight now its block's m: another product
        assert not torch.equal(step(), planned)
        q_proj.blocks.data = kept
        assert torch.equal(step(), planned)
        # The step calls the decode kernel itself only while the layer's attention function is the hook's
        # own sdpa wrapper; one replaced since is called.
        from infmllm_ros.engine.attention import is_decode_kernel_wrapper

        wrapper = attn._infmllm_base
        assert is_decode_kernel_wrapper(wrapper)

        @functools.wraps(wrapper)  # (copies the wrapper's attributes: found by a review)
        def halved(*args, **kwargs):
            calls.append(2)
            return wrapper(*args, **kwargs)[0] * 0.5, None

        for replacement in (halved, lambda *args, **kwargs: halved(*args, **kwargs)):
            attn._infmllm_base = replacement
            try:
                assert not torch.equal(step(), planned) and calls.count(2) == 2
            finally:
                attn._infmllm_base = wrapper
                calls.clear()
        assert torch.equal(step(), planned)
        # A projection sent to its float weight by a max_rows below 1 (NaN included: found by a review) in any
        # layer, not only the first checked
        down = lm.model.model.layers[1].mlp.down_proj
        kept_rows = down.max_rows
        for rows in (0, float("nan")):
            down.max_rows = rows
            try:
                step()  # the model's bits (asserted in step)
            finally:
                down.max_rows = kept_rows
        assert torch.equal(step(), planned)
        assert all(streams[0]._direct.joined)  # planned again, every layer on the C++ calls
    finally:
        attn.q_proj = q_proj
        for s in streams:
            s.close()
