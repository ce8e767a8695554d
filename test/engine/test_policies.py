"""Each policy keeps exactly the tokens its rule says, on hand-built attention patterns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from infmllm_ros.engine import (H2O, POLICIES, CappedCache, Full, InfMLLM, Policy, StreamingLLM, TokenBuffer, Window,
                                make_policy)
from infmllm_ros.engine.rope import RopeSpec

DIM = 8


def _cache(policy, budget, max_chunk=4, rotate=True):
    """``rotate=False``: a RoPE of frequency 0, so re-rotation leaves keys as built (tests of scores over steps)."""
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2) if rotate else torch.zeros(DIM // 2), components=1)
    return CappedCache(1, policy, budget, max_chunk, rope)


def _append(cache, keys, query, decoding=False):
    """Append ``keys`` (``[heads, n, DIM]``) as one step and run the eviction with ``query`` (``[heads, q, DIM]``)."""
    n = keys.shape[1]
    start = cache.next_position
    cache.make_room(n)
    cache.begin_step(torch.arange(cache.next_position, cache.next_position + n).unsqueeze(-1))
    cache.decoding = decoding
    layer = cache.layers[0]
    layer.update(keys.unsqueeze(0), keys.unsqueeze(0).clone())
    layer.after_attention(query.unsqueeze(0), scaling=1.0, attn_weights=None)
    del start
    return cache.end_step(n)


def _kept(cache, head=0):
    return cache.layers[0].seen[0, head].tolist()


def _background(n, heads=1):
    torch.manual_seed(0)
    return torch.randn(heads, n, DIM) * 0.01


def test_registry_names_every_policy():
    assert set(POLICIES) == {"full", "window", "streamingllm", "h2o", "infmllm"}
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("lru")


def test_full_never_evicts():
    cache = _cache(Full(), budget=4)
    _append(cache, _background(10), torch.randn(1, 10, DIM))
    assert _kept(cache) == list(range(10))


def test_window_keeps_the_newest_and_no_sinks():
    cache = _cache(make_policy("window", sinks=4), budget=4, max_chunk=10)
    _append(cache, _background(10), torch.randn(1, 10, DIM))
    assert _kept(cache) == [6, 7, 8, 9]


def test_streamingllm_keeps_sinks_and_recent():
    cache = _cache(StreamingLLM(sinks=2), budget=6, max_chunk=10)
    _append(cache, _background(10), torch.randn(1, 10, DIM))
    assert _kept(cache) == [0, 1, 6, 7, 8, 9]
    # and again once more tokens arrive: sinks survive every step
    _append(cache, _background(1), torch.randn(1, 1, DIM), decoding=True)
    assert _kept(cache) == [0, 1, 7, 8, 9, 10]


def test_infmllm_keeps_attention_saddles_recent_and_the_new_chunk():
    u = torch.zeros(DIM)
    u[0] = 1.0
    old = _background(10)
    for saddle in (3, 5, 6):
        old[0, saddle] = 8.0 * u
    cache = _cache(InfMLLM(sinks=1, recent=2, retrieval_window=2, bias=0.0, per_head=False), budget=8, max_chunk=2)
    _append(cache, old, torch.zeros(1, 10, DIM), decoding=True)  # fills the cache, no chunk yet
    assert len(_kept(cache)) == 10  # decoding within budget + one chunk: no eviction
    new = _background(2)
    _append(cache, new, u.expand(1, 2, DIM).clone())
    # sink 0, saddles 3, 5, 6, recent 8, 9, and the whole new chunk 10, 11
    assert _kept(cache) == [0, 3, 5, 6, 8, 9, 10, 11]


def test_infmllm_bias_shifts_the_cache_toward_newer_tokens():
    u = torch.zeros(DIM)
    u[0] = 1.0
    old = _background(10)
    for saddle in (1, 2, 3):
        old[0, saddle] = 1.0 * u  # mildly attended early tokens

    def kept(bias):
        cache = _cache(InfMLLM(sinks=1, recent=2, retrieval_window=2, bias=bias, per_head=False), 8, 2)
        _append(cache, old, torch.zeros(1, 10, DIM), decoding=True)
        _append(cache, _background(2), u.expand(1, 2, DIM).clone())
        return _kept(cache)

    assert kept(0.0) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert kept(50.0) == [0, 5, 6, 7, 8, 9, 10, 11]


def test_infmllm_per_head_selection_differs_between_heads():
    u, v = torch.zeros(DIM), torch.zeros(DIM)
    u[0], v[1] = 1.0, 1.0
    old = _background(10, heads=2)
    for saddle in (2, 3, 4):
        old[0, saddle] = 8.0 * u
    for saddle in (5, 6, 7):
        old[1, saddle] = 8.0 * v
    query = torch.stack([u.expand(1, DIM), v.expand(1, DIM)])  # [2 heads, 1, DIM]
    cache = _cache(InfMLLM(sinks=1, recent=1, retrieval_window=1, bias=0.0, per_head=True), budget=6, max_chunk=4)
    _append(cache, old, torch.zeros(2, 10, DIM), decoding=True)
    _append(cache, _background(1, heads=2), query)
    assert _kept(cache, head=0) == [0, 2, 3, 4, 9, 10]
    assert _kept(cache, head=1) == [0, 5, 6, 7, 9, 10]


def test_h2o_accumulates_attention_across_steps():
    u = torch.zeros(DIM)
    u[0] = 1.0
    keys = _background(8)
    keys[0, 2] = 6.0 * u  # heavily attended by every query
    cache = _cache(H2O(recent_ratio=0.5), budget=4, max_chunk=8)
    _append(cache, keys, u.expand(1, 8, DIM).clone())
    # 2 recent (6, 7) + 2 heavy hitters; token 2 must be one of them
    kept = _kept(cache)
    assert len(kept) == 4 and 2 in kept and kept[-2:] == [6, 7]
    # every decoding step evicts one token, and the heavy hitter keeps its place
    for _ in range(3):
        _append(cache, _background(1), u.expand(1, 1, DIM).clone(), decoding=True)
        assert len(_kept(cache)) == 4 and 2 in _kept(cache)


def test_budget_must_hold_what_is_always_kept():
    with pytest.raises(ValueError, match="sink"):
        InfMLLM(sinks=4, recent=60).check_budget(64, 16)
    with pytest.raises(ValueError, match="whole"):
        InfMLLM(sinks=4, recent=8).check_budget(32, 32)
    with pytest.raises(ValueError, match=">= 0"):
        StreamingLLM(sinks=-1)
    with pytest.raises(ValueError, match="recent_ratio"):
        H2O(recent_ratio=1.5)
    Full().check_budget(0, 256)  # full needs no budget


def test_window_policy_has_no_sinks():
    assert Window().sinks == 0
    assert make_policy("window", sinks=4, bias=1.0).sinks == 0


def test_an_aborted_step_leaves_the_cache_as_it_was():
    cache = _cache(StreamingLLM(sinks=1), budget=8)
    _append(cache, _background(6), _background(2))
    before = (cache.tokens_seen, cache.next_position, _kept(cache))
    cache.begin_step(torch.arange(cache.next_position, cache.next_position + 3).unsqueeze(-1))
    cache.abort_step()  # the model's forward raised before the layer stored anything
    assert (cache.tokens_seen, cache.next_position, _kept(cache)) == before
    with pytest.raises(RuntimeError):  # no step is pending any more
        cache.pending(3, torch.device("cpu"))
    _append(cache, _background(3), _background(1))  # and the next step works
    assert cache.tokens_seen == before[0] + 3 and _kept(cache)[-3:] == [6, 7, 8]


def _unit(i):
    v = torch.zeros(DIM)
    v[i] = 1.0
    return v


def _keys(n, spikes):
    keys = _background(n)
    for index, key in spikes.items():
        keys[0, index] = key
    return keys


def test_infmllm_pooling_keeps_a_fact_with_its_neighbours():
    u = _unit(0)
    old = _keys(10, {2: 4.0 * u, 5: 8.0 * u})  # a weaker saddle at 2, a strong one at 5

    def kept(pool):
        cache = _cache(InfMLLM(sinks=1, recent=2, retrieval_window=2, per_head=False, pool=pool), 8, 2)
        _append(cache, old, torch.zeros(1, 10, DIM), decoding=True)
        _append(cache, _background(2), u.expand(1, 2, DIM).clone())
        return _kept(cache)

    assert {2, 5} <= set(kept(1))  # token by token: both saddles, scattered
    assert kept(3) == [0, 4, 5, 6, 8, 9, 10, 11]  # pooled: the strong saddle and its neighbours together


def test_infmllm_decay_carries_a_saddle_over_a_chunk_that_looks_elsewhere():
    u, w = _unit(0), _unit(1)

    def kept(decay):
        cache = _cache(InfMLLM(sinks=1, recent=0, retrieval_window=2, per_head=False, decay=decay), 4, 2, False)
        _append(cache, _background(2), _background(2))
        _append(cache, _keys(2, {0: 8.0 * u}), _background(2))  # token 2: a fact
        _append(cache, _keys(2, {0: 1.0 * w}), u.expand(1, 2, DIM).clone())  # a chunk attends to the fact
        first = _kept(cache)
        _append(cache, _background(2), w.expand(1, 2, DIM).clone())  # the next one mildly to token 4
        return first, _kept(cache)

    assert kept(0.0) == ([0, 2, 4, 5], [0, 4, 6, 7])  # without memory the fact goes at once
    assert kept(0.5) == ([0, 2, 4, 5], [0, 2, 6, 7])  # carried over, it outweighs a mild new score


def test_infmllm_max_carry_remembers_a_question_finding_its_fact_over_a_template_every_chunk_looks_at():
    u, w = _unit(0), _unit(1)

    def held_fact(carry):
        """The one free slot after each chunk once the fact (token 16) has arrived."""
        cache = _cache(InfMLLM(sinks=1, recent=0, retrieval_window=2, per_head=False, decay=0.9, carry=carry), 4, 2,
                       False)
        mild = (0.125 * w).expand(1, 2, DIM).clone()  # every chunk looks a little at the template
        _append(cache, _background(2), _background(2))
        _append(cache, _keys(2, {0: 8.0 * w}), _background(2))  # token 2: a template (a repeated question's words)
        for _ in range(6):
            _append(cache, _background(2), mild)
        _append(cache, _keys(2, {0: 8.0 * u}), mild)  # token 16: a fact
        slots = []
        _append(cache, _background(2), u.expand(1, 2, DIM).clone())  # a question finds the fact
        slots.append(_kept(cache)[1])
        for _ in range(3):
            _append(cache, _background(2), mild)
            slots.append(_kept(cache)[1])
        return slots

    # summed, the template's steady attention has added up past anything one question gives the fact
    assert held_fact("sum") == [2, 2, 2, 2]
    # the larger of the two: the question's look is remembered, fading by 0.9 a chunk, above the mild one
    assert held_fact("max") == [16, 16, 16, 16]


def _append_kind(cache, keys, query, frame):
    """``_append`` for a chunk that is (``frame``) or is not a camera frame: the stream's frame flag set."""
    n = keys.shape[1]
    cache.make_room(n)
    values = {"frame": torch.full((n,), frame)} if "frame" in cache.token_buffers else None
    cache.begin_step(torch.arange(cache.next_position, cache.next_position + n).unsqueeze(-1), values)
    cache.decoding = False
    cache.layers[0].update(keys.unsqueeze(0), keys.unsqueeze(0).clone())
    cache.layers[0].after_attention(query.unsqueeze(0), scaling=1.0, attn_weights=None)
    return cache.end_step(n)


def test_infmllm_unbiased_frames_keep_an_old_observation_a_question_found_while_the_cameras_go_on():
    u, w = _unit(0), _unit(1)

    def kept(bias_frames, frames_after):
        cache = _cache(InfMLLM(sinks=1, recent=0, retrieval_window=2, per_head=False, bias=1.0, decay=0.9,
                               bias_frames=bias_frames), 4, 2, False)
        _append_kind(cache, _background(2), _background(2), frame=False)  # the system prompt
        _append_kind(cache, _keys(2, {0: 8.0 * u}), _background(2), frame=True)  # token 2: an observation
        _append_kind(cache, _background(2), u.expand(1, 2, DIM).clone(), frame=False)  # a question finds it
        held = []
        for _ in range(5):  # more frames (or more talk), looking at nothing in particular
            _append_kind(cache, _background(2), w.expand(1, 2, DIM).clone(), frame=frames_after)
            held.append(_kept(cache)[1])
        return held

    # the paper's bias ages every token alike: the observation goes once its age outweighs what it was found for
    assert kept(True, True) == [2, 2, 2, 11, 13]
    # frames count on no clock: the observation stays while the cameras go on
    assert kept(False, True) == [2, 2, 2, 2, 2]
    # the talk ages it as it ages everything
    assert kept(False, False) == [2, 2, 2, 11, 13]


def test_infmllm_unbiased_frames_age_the_conversation_by_the_talk_only():
    """An answer the node gave stays as young as the conversation after it, however many frames came since."""
    w = _unit(1)
    cache = _cache(InfMLLM(sinks=1, recent=0, retrieval_window=2, per_head=False, bias=1.0, decay=0.9,
                           bias_frames=False), 6, 2, False)
    _append_kind(cache, _background(1), _background(1), frame=False)  # the system prompt
    _append_kind(cache, _keys(2, {0: 3.0 * w, 1: 3.0 * w}), _background(2), frame=False)  # tokens 1-2: an answer
    held = []
    for _ in range(FRAMES):  # frames, each looking back at the answer (the model's example of how to answer)
        _append_kind(cache, _background(2), w.expand(1, 2, DIM).clone(), frame=True)
        held.append(_kept(cache)[:3])
    # read on the stream's clock the answer would be up to 2 * FRAMES tokens old, 4 times the budget of 6,
    # and gone; read on the talk's it has not aged at all
    assert held == [[0, 1, 2]] * FRAMES and cache.evictions > FRAMES
    assert cache.layers[0].held("talk")[0, 0].tolist() == [0, 1, 2] + [3] * (len(_kept(cache)) - 3)


FRAMES = 12


def test_the_conversation_clock_counts_talk_not_frames_and_goes_on_from_the_newest_counted_row():
    from infmllm_ros.engine.policies import conversation_clock

    frame = torch.tensor([[[False, False, True, True, False, True, False]]])
    fresh = torch.full((1, 1, 7), -1)
    seen = torch.arange(7).view(1, 1, 7)
    # a fresh stream's first eviction: every token still held, the clock is the talk before each
    assert conversation_clock(fresh, frame, seen).tolist() == [[[0, 1, 2, 2, 2, 3, 3]]]
    # rows 0-3 were counted at an earlier eviction (rows in between it let go: 5 and 9 are not consecutive)
    talk = torch.tensor([[[0, 5, 9, 9, -1, -1, -1]]])
    later = torch.tensor([[[0, 7, 12, 13, 14, 15, 16]]])
    assert conversation_clock(talk, frame, later).tolist() == [[[0, 5, 9, 9, 9, 10, 10]]]
    # the newest counted row was conversation: the count goes on one past it
    talk = torch.tensor([[[0, 5, -1, -1, -1, -1, -1]]])
    assert conversation_clock(talk, frame, later).tolist() == [[[0, 5, 6, 6, 6, 7, 7]]]
    # a memory saved without the clock (or its frames' flags): the stream index, gaps and all, as the default
    # rule reads ages
    text = torch.zeros_like(frame)
    assert conversation_clock(fresh, text, later).tolist() == later.tolist()


def test_infmllm_unbiased_frames_refuse_settings_that_could_lose_the_clock():
    with pytest.raises(ValueError, match="recent > 0 or keep_new_chunk"):
        InfMLLM(decay=0.9, bias_frames=False, recent=0, keep_new_chunk=False)
    InfMLLM(decay=0.9, bias_frames=False, recent=0)  # the new chunk keeps the newest row


@pytest.mark.parametrize("bias, per_head", [(1.0, True), (1.0, False), (0.0, True), (0.0, False)])
def test_infmllm_unbiased_frames_change_nothing_in_a_stream_without_frames(bias, per_head):
    """Text, questions and answers keep the bias rule exactly: same rows kept as the default policy's (at bias 0
    with one set of rows for all heads too, where the heads' raw looks are averaged)."""
    for seed, (sinks, recent, pool) in enumerate([(2, 3, 3), (0, 0, 1), (1, 2, 1), (0, 0, 3)] * 2):
        torch.manual_seed(seed)
        caches = [_cache(InfMLLM(sinks=sinks, recent=recent, retrieval_window=4, bias=bias, pool=pool,
                                 per_head=per_head, **knobs), sinks + recent + 8 + 4 * (seed % 3), 6)
                  for knobs in ({}, {"decay": 0.9, "bias_frames": False})]
        heads = 2
        for step in range(24):
            n = 1 + step % 6
            keys, query = torch.randn(heads, n, DIM) * 2, torch.randn(heads, n, DIM) * 2
            for cache in caches:
                _append_kind(cache, keys, query, frame=False)
            assert [_kept(caches[0], h) for h in range(heads)] == [_kept(caches[1], h) for h in range(heads)], \
                (seed, step)
        assert caches[0].evictions > 5


def test_infmllm_chunk_granularity_keeps_or_drops_a_chunk_whole():
    u = _unit(0)

    def kept(granularity):
        cache = _cache(InfMLLM(sinks=1, recent=0, retrieval_window=3, per_head=False, granularity=granularity), 7,
                       3, False)
        _append(cache, _background(1), _background(1))
        _append(cache, _keys(3, {1: 8.0 * u}), _background(3))  # chunk 1-3: one strong token
        _append(cache, _keys(3, {0: 3.0 * u, 2: 3.0 * u}), _background(3))  # chunk 4-6: two mild ones
        _append(cache, _background(3), u.expand(1, 3, DIM).clone())
        return _kept(cache)

    assert kept("token") == [0, 2, 4, 6, 7, 8, 9]
    assert kept("chunk") == [0, 1, 2, 3, 7, 8, 9]


def test_infmllm_refinements_refuse_bad_values():
    with pytest.raises(ValueError, match="odd"):
        InfMLLM(pool=4)
    with pytest.raises(ValueError, match="decay"):
        InfMLLM(decay=1.0)
    with pytest.raises(ValueError, match="granularity"):
        InfMLLM(granularity="line")
    with pytest.raises(ValueError, match="carry"):
        InfMLLM(carry="mean")
    with pytest.raises(ValueError, match="needs decay"):  # it would silently change nothing
        InfMLLM(carry="max")
    with pytest.raises(ValueError, match="bias_frames False needs decay"):  # frames rank by carried scores
        InfMLLM(bias_frames=False)
    with pytest.raises(ValueError, match="bias_frames must be True or False"):
        make_policy("infmllm", bias_frames="false", decay=0.9)


def test_a_policy_asks_for_its_own_per_token_buffer_and_the_cache_keeps_it_in_step():
    @dataclass
    class ByTag(Policy):
        """Keeps the tokens with the highest tag (a per-token value the stream gives)."""

        name: ClassVar[str] = "bytag"
        token_buffers: ClassVar[dict] = {"tag": TokenBuffer(torch.float32, fill=-1.0)}

        def score(self, view):
            return view.buffers["tag"]

    cache = _cache(ByTag(), budget=4, max_chunk=10)
    layer = cache.layers[0]
    keys = _background(10)
    tags = torch.tensor([5.0, 1, 7, 2, 9, 3, 8, 0, 6, 4])
    cache.begin_step(torch.arange(10).unsqueeze(-1), values={"tag": tags})
    layer.update(keys.unsqueeze(0), keys.unsqueeze(0).clone())
    layer.after_attention(torch.zeros(1, 1, 10, DIM), scaling=1.0, attn_weights=None)
    assert cache.end_step(10) == 6
    assert _kept(cache) == [2, 4, 6, 8]
    # the buffer was gathered with the keys, row for row
    assert layer.held("tag")[0, 0].tolist() == [7.0, 9.0, 8.0, 6.0]
    torch.testing.assert_close(layer.held("keys")[0, 0], keys[0, [2, 4, 6, 8]])
    # a new token without a value gets the buffer's fill
    cache.begin_step(torch.tensor([[10]]))
    layer.update(_background(1).unsqueeze(0), _background(1).unsqueeze(0))
    layer.after_attention(torch.zeros(1, 1, 1, DIM), scaling=1.0, attn_weights=None)
    cache.end_step(1)
    assert 10 not in _kept(cache)  # fill -1 scores below every tag
    with pytest.raises(ValueError, match="no per-token buffer named"):
        cache.begin_step(torch.tensor([[11]]), values={"colour": torch.zeros(1)})


def test_infmllm_carried_scores_and_chunk_numbers_stay_row_for_row_with_the_keys_through_compaction():
    """decay and granularity "chunk" keep their per-token state in the cache's named buffers: every in-place
    compaction must move a token's carried score and chunk number with its key, per head."""
    policy = InfMLLM(sinks=1, recent=1, retrieval_window=3, per_head=True, decay=0.5, granularity="chunk")
    cache = _cache(policy, budget=6, max_chunk=3, rotate=False)
    layer = cache.layers[0]
    assert set(cache.token_buffers) == {"seen", "positions", "carried", "chunk"}
    torch.manual_seed(1)
    chunk_of, sizes = {}, [1, 3, 2, 3, 3, 1, 3, 2, 3]
    evicted = 0
    for number, n in enumerate(sizes):
        first = cache.tokens_seen
        chunk_of.update({first + i: number for i in range(n)})
        # Two heads that look at different keys, so they keep different rows (a gather, not a block copy).
        keys, query = torch.randn(2, n, DIM), torch.randn(2, n, DIM) * 3.0
        cache.make_room(n)
        cache.begin_step(torch.arange(cache.next_position, cache.next_position + n).unsqueeze(-1))
        layer.update(keys.unsqueeze(0), keys.unsqueeze(0).clone())
        layer.after_attention(query.unsqueeze(0), scaling=1.0, attn_weights=None)
        stored = cache.length + n
        before_seen = layer.held("seen", stored)[0].clone()
        expected = None
        if "window" in layer._stats:  # this step evicts: carried = window attention + decay * carried so far
            expected = layer._stats["window"][0] + 0.5 * layer.held("carried", stored)[0]
        evicted += cache.end_step(n)
        seen, carried = layer.held("seen")[0], layer.held("carried")[0]
        chunk = layer.held("chunk")[0]
        assert chunk.tolist() == [[chunk_of[int(s)] for s in head] for head in seen]
        for head in range(2):
            for row, s in enumerate(seen[head].tolist()):
                old = before_seen[head].tolist().index(s)
                want = 0.0 if expected is None and s >= first else None
                if expected is not None:
                    want = float(expected[head, old])
                if want is not None:
                    assert float(carried[head, row]) == pytest.approx(want, abs=1e-6)
    assert evicted > 0 and cache.chunks_begun == len(sizes)
    assert layer.held("seen")[0, 0].tolist() != layer.held("seen")[0, 1].tolist()  # the heads kept different rows


def _append_from(cache, n, source):
    """One step of ``n`` background tokens from ``source`` (-1: none), evicted by StreamingLLM's rule."""
    cache.make_room(n)
    cache.begin_step(torch.arange(cache.next_position, cache.next_position + n).unsqueeze(-1),
                     values={CappedCache.SOURCE: torch.full((n,), source)} if cache.keep_latest_per_source else None)
    layer = cache.layers[0]
    keys = _background(n)
    layer.update(keys.unsqueeze(0), keys.unsqueeze(0).clone())
    layer.after_attention(_background(n).unsqueeze(0), scaling=1.0, attn_weights=None)
    return cache.end_step(n)


def test_keep_latest_per_source_keeps_each_sources_newest_chunk_whatever_the_policy_scores():
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2), components=1)
    held = {}
    for pin in (False, True):
        cache = CappedCache(1, StreamingLLM(sinks=1), 6, 3, rope, keep_latest_per_source=pin)
        assert (CappedCache.SOURCE in cache.token_buffers) is pin
        steps = [(1, -1), (2, 9), (2, 7), (2, 7), (2, 7)]  # a sink, camera 9 once, then camera 7 keeps talking
        for n, source in steps:
            _append_from(cache, n, source)
        held[pin] = _kept(cache)
        if pin:
            # camera 9 reports again: its older chunk is no longer its newest and goes like any other
            _append_from(cache, 2, 9)
            assert _kept(cache) == [0, 6, 7, 8, 9, 10]
            assert layer_sources(cache) == [-1, 7, 7, 7, 9, 9]
    assert held[False] == [0, 4, 5, 6, 7, 8]  # the recency rule alone: camera 9's line is gone
    assert held[True] == [0, 1, 2, 6, 7, 8]  # its line stays, the newest of camera 7 too


def layer_sources(cache):
    return cache.layers[0].held(CappedCache.SOURCE)[0, 0].tolist()


def test_keep_latest_per_source_yields_to_sinks_and_recent_and_keeps_the_newest_first():
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2), components=1)
    # Inf-MLLM keeps its sink, 1 recent token and the new chunk first: 1 + 1 + 2 of a budget of 8 leaves
    # 4 rows: the two newest sources' chunks (2 rows each), not the oldest one's.
    cache = CappedCache(1, InfMLLM(sinks=1, recent=1, retrieval_window=2, per_head=False), 8, 2, rope,
                        keep_latest_per_source=True)
    for n, source in [(1, -1), (2, 9), (2, 7), (2, 5), (1, -1), (2, -1)]:
        _append_from(cache, n, source)
    assert _kept(cache) == [0, 3, 4, 5, 6, 7, 8, 9]


def test_keep_latest_per_source_keeps_whole_chunks_never_a_lines_last_tokens():
    """Room for 3 pinned rows and two 2-row chunks: the newest chunk whole, the older one not cut to its
    last row (which would lose the line's time and camera and still take room)."""
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2), components=1)
    cache = CappedCache(1, StreamingLLM(sinks=1), 4, 3, rope, keep_latest_per_source=True)
    for n, source in [(1, -1), (2, 9), (2, 7), (3, -1)]:
        _append_from(cache, n, source)
    assert _kept(cache) == [0, 3, 4, 7]  # camera 7's line whole, then the newest token by StreamingLLM's rule


def test_a_line_let_go_loses_its_camera_on_the_rows_the_tail_still_keeps():
    """A line longer than the room, its last rows inside the recent tail when it is let go: those rows
    lose the camera too, or they come back as the camera's kept line once they leave the tail, cut to
    its last tokens (no time, no camera name)."""
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2), components=1)
    cache = CappedCache(1, InfMLLM(sinks=1, recent=2, retrieval_window=2, per_head=False), 9, 6, rope,
                        keep_latest_per_source=True)
    _append_from(cache, 1, -1)
    _append_from(cache, 6, 7)  # camera 7's line: 6 rows, room for pins is 9 - 1 - (2 + 3) = 3 at the next step
    for _ in range(4):
        _append_from(cache, 3, -1)
        assert 7 not in layer_sources(cache)
    assert not {5, 6} <= set(_kept(cache))  # the line's end is not held for good


@dataclass
class _Parity(Policy):
    """Head h keeps the chunks whose number has parity h: the heads hold different chunks."""

    name: ClassVar[str] = "parity"
    token_buffers: ClassVar[dict[str, TokenBuffer]] = {"chunk": TokenBuffer(torch.long, fill=-1)}
    per_head: bool = True
    sinks: int = 1

    def score(self, view):
        head = torch.arange(view.seen.shape[1]).view(1, -1, 1)
        return ((view.buffers["chunk"] % 2) == head).float() + view.seen.float() * 1e-6


def test_keep_latest_per_source_with_heads_holding_more_distinct_chunks_than_rows():
    """A per-head policy (H2O, Inf-MLLM) lets each head keep other chunks: over the heads, more distinct
    chunk numbers than one head's rows. Numbering them densely over all heads at once indexed past the
    rows (a RuntimeError in a long stream); each camera's newest chunk is kept in every head."""
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2), components=1)
    cache = CappedCache(1, _Parity(), 6, 2, rope, keep_latest_per_source=True)
    layer = cache.layers[0]
    torch.manual_seed(0)
    for i in range(30):
        cache.make_room(1)
        cache.begin_step(torch.tensor([[cache.next_position]]),
                         values={CappedCache.SOURCE: torch.tensor([5 if i == 3 else -1])})
        keys = torch.randn(1, 2, 1, DIM)
        layer.update(keys, keys.clone())
        layer.after_attention(torch.randn(1, 2, 1, DIM), scaling=1.0, attn_weights=None)
        cache.end_step(1)
    assert layer.held("seen")[0].tolist() == [[0, 3, 22, 24, 26, 28], [0, 3, 23, 25, 27, 29]]


def test_latest_chunks_keeps_whole_newest_chunks_that_fit_and_lets_the_rest_go():
    from infmllm_ros.engine.cache import latest_chunks

    # rows:      0   1  2  3  4  5  6  7  8  9
    source = torch.tensor([-1, 7, 7, 9, 9, 9, 7, 7, 5, 5])
    chunk = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 4, 4])
    forced = torch.zeros(10, dtype=torch.bool)
    forced[0] = forced[9] = True  # a sink, and a tail reaching into camera 5's chunk
    chosen, released = latest_chunks(source, chunk, forced, room=5)
    # camera 7's newest chunk is 3 (rows 6-7), camera 5's rows outside the tail (row 8) come first: 1 + 2
    # rows fit, camera 9's 3 rows (2-4 -> 3 more = 6 > 5) do not and are let go; chunk 1 is not newest.
    assert chosen.nonzero().flatten().tolist() == [6, 7, 8]
    assert released.nonzero().flatten().tolist() == [3, 4, 5]
    chosen, released = latest_chunks(source, chunk, forced, room=6)
    assert chosen.nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8] and not released.any()


def test_keep_latest_per_camera_is_refused_unless_a_bool():
    from infmllm_ros.engine import StreamConfig

    with pytest.raises(ValueError, match="keep_latest_per_camera must be true or false"):
        StreamConfig(keep_latest_per_camera="yes").validate()


def test_the_pieces_of_a_split_chunk_share_its_chunk_number():
    rope = RopeSpec(inv_freq=torch.ones(DIM // 2), components=1)
    cache = CappedCache(1, InfMLLM(sinks=1, recent=1, retrieval_window=2, granularity="chunk"), 16, 4, rope)
    layer = cache.layers[0]
    for n, continues in [(2, False), (4, False), (4, True), (3, False)]:
        cache.begin_step(torch.arange(cache.next_position, cache.next_position + n).unsqueeze(-1), continues=continues)
        layer.update(_background(n).unsqueeze(0), _background(n).unsqueeze(0))
        layer.after_attention(_background(n).unsqueeze(0), scaling=1.0, attn_weights=None)
        cache.end_step(n)
    assert layer.held(CappedCache.CHUNK)[0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]


def test_rerotation_by_the_shared_angle_table_is_rotation_by_the_shift():
    """Keys rotated by RoPE at positions p and re-rotated by delta through the table one compaction shares
    are the keys rotated at p + delta (to float32 rounding), for shifts in both directions; a shift past
    the table's span is refused (it would read another shift's angles)."""
    from infmllm_ros.engine.rope import RotationTable, rerotate

    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    raw = torch.randn(1, 3, 50, 64, dtype=torch.float64)
    old = torch.randint(0, 400, (1, 3, 50))
    delta = torch.randint(-200, 60, (1, 3, 50))

    def rope_at(x, positions):
        angles = positions.double().unsqueeze(-1) * inv_freq.double()
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        return x * cos + torch.cat((-x[..., 32:], x[..., :32]), -1) * sin

    table = RotationTable.build(inv_freq, 400, torch.device("cpu"))
    got = rerotate(rope_at(raw, old).float(), delta, inv_freq, table)
    torch.testing.assert_close(got.double(), rope_at(raw, old + delta), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rerotate(rope_at(raw, old).float(), delta, inv_freq), got)  # its own table
    with pytest.raises(IndexError):
        rerotate(rope_at(raw, old).float(), delta, inv_freq, RotationTable.build(inv_freq, 100, torch.device("cpu")))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_step_wants_statistics_exactly_when_its_layers_collect_them(name):
    # The direct decode step skips after_attention where the cache says the step wants no statistics
    # (CappedCache.wants_statistics): it may say so only where after_attention would collect nothing.
    policy = make_policy(name, sinks=1, recent=2)
    cache = _cache(policy, budget=64 if name == "full" else 8, max_chunk=4)
    layer, seen = cache.layers[0], []
    for step in range(14):
        decoding = step >= 6  # six chunks of four tokens, then an answer of eight tokens
        n = 1 if decoding else 4
        cache.decoding = decoding
        cache.make_room(n)
        cache.begin_step(torch.arange(cache.next_position, cache.next_position + n).unsqueeze(-1))
        keys = _background(n)
        layer.update(keys.unsqueeze(0), keys.unsqueeze(0).clone())
        wanted = cache.wants_statistics()
        layer.after_attention(torch.randn(1, 1, n, DIM), scaling=1.0, attn_weights=None)
        assert wanted == bool(layer._stats), (step, wanted, layer._stats.keys())
        seen.append(wanted)
        cache.end_step(n)
    # H2O accumulates at every step; Inf-MLLM scores only the chunks that evict (not the answer, which grows
    # into its room); the others never score
    expected = {"h2o": {True}, "infmllm": {True, False}}.get(name, {False})
    assert set(seen) == expected, seen
