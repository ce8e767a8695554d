"""The engine on real weights: SmolLM2-135M-Instruct (1-D RoPE, grouped-query attention)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from infmllm_ros.bench.common import raw_stream
from infmllm_ros.engine import POLICIES, Cancelled, Chunk, Stream, StreamConfig

pytestmark = pytest.mark.model


def _raw_stream(lm, **settings) -> Stream:
    """A stream that skips the chat framing, so token i of the text is stream token i."""
    return raw_stream(lm, StreamConfig(**settings))


def _nll(stream, ids, chunk):
    """Summed negative log-likelihood of ``ids`` streamed in chunks, and the count of predicted tokens."""
    total, count, previous = 0.0, 0, None
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logp = torch.log_softmax(stream.append_chunk(Chunk(input_ids=piece), return_logits=True).logits, -1)
        target = piece[0]
        if previous is not None:
            total -= previous[target[0]].item()
            count += 1
        total -= logp[:-1].gather(1, target[1:, None]).sum().item()
        count += target.numel() - 1
        previous = logp[-1]
    return total, count


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_with_a_budget_as_long_as_the_stream_every_policy_matches_the_plain_forward(smollm2, emma_ids, policy):
    ids = emma_ids[:, :600]
    with torch.inference_mode():
        reference = smollm2.model(input_ids=ids).logits[0].float()
    stream = _raw_stream(smollm2, policy=policy, budget_tokens=1024, max_chunk_tokens=128)
    try:
        got = torch.cat([stream.append_chunk(Chunk(input_ids=ids[:, i : i + 128]), return_logits=True).logits
                         for i in range(0, 600, 128)])
    finally:
        stream.close()
    assert got.shape == reference.shape
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-3)


def test_held_fraction_counts_what_each_layer_and_head_still_holds(smollm2, emma_ids):
    stream = _raw_stream(smollm2, policy="streamingllm", budget_tokens=64, max_chunk_tokens=16, sinks=4)
    try:
        for start in range(0, 160, 16):
            stream.append_chunk(Chunk(input_ids=emma_ids[:, start : start + 16]))
        seen = stream.stats().tokens_seen
        assert stream.held_fraction(0, 4) == 1.0  # the sinks, in every layer and head
        assert stream.held_fraction(seen - 64 + 4, seen) == 1.0  # the recent window
        assert stream.held_fraction(4, 64) == 0.0  # evicted everywhere
        assert stream.held_fraction(0, 8) == 0.5  # half of it: the 4 sinks
        for bad in ((5, 5), (-1, 3), (9, 2), (seen - 5, seen + 5), (0, 10**30)):  # empty, reversed, unseen
            with pytest.raises(ValueError, match="start < end <= tokens seen"):
                stream.held_fraction(*bad)
        for bad in ((0, 0.5), (0.5, 3.2)):
            with pytest.raises(TypeError):
                stream.held_fraction(*bad)
        assert type(stream.held_fraction(torch.tensor(0), torch.tensor(4))) is float
    finally:
        stream.close()
    h2o = _raw_stream(smollm2, policy="h2o", budget_tokens=64, max_chunk_tokens=16)
    try:
        for start in range(0, 160, 16):
            h2o.append_chunk(Chunk(input_ids=emma_ids[:, start : start + 16]))
        # per-head heavy hitters: the shares over the whole stream add up to what each head keeps
        assert h2o.held_fraction(0, 160) == pytest.approx(h2o.stats().tokens_held / 160)
    finally:
        h2o.close()


def _door_then_front(stream, lines=24, door=True):
    """A quiet camera's one line (if ``door``), then a busy camera's ``lines``; returns the door line's
    stream indices ``(start, end)``."""
    span = None
    if door:
        line = stream.append_text("12:00:00 door: 1 person in red (left)", kind="frame", camera="door")
        end = stream.stats().tokens_seen  # (the first line also opens the stream: the system prompt before it)
        span = (end - line.tokens, end)
    for i in range(lines):
        stream.append_text(f"12:00:{i + 1:02d} front: {i % 5} people in black (centre)", kind="frame",
                           camera="front")
    return span


@pytest.mark.parametrize("policy", ["window", "streamingllm", "h2o", "infmllm"])
def test_keep_latest_per_camera_holds_a_quiet_cameras_last_line_while_a_busy_one_streams(smollm2, tmp_path, policy):
    settings = dict(policy=policy, budget_tokens=192, max_chunk_tokens=48)
    plain = Stream(smollm2, StreamConfig(**settings))
    try:
        door = _door_then_front(plain)
        if policy in ("window", "streamingllm"):  # recency alone: 24 lines of ~17 tokens push it out
            assert plain.held_fraction(*door) == 0.0
    finally:
        plain.close()
    stream = Stream(smollm2, StreamConfig(**settings, keep_latest_per_camera=True))
    try:
        door = _door_then_front(stream)
        seen = stream.stats().tokens_seen
        assert stream.stats().tokens_held <= 192 + 48
        assert stream.held_fraction(*door) == 1.0  # in every layer and KV head
        assert stream.held_fraction(seen - 10, seen) == 1.0  # the newest front line too
        # ... and through a question and its answer, a save and a load, and more lines
        stream.ask("What did camera door see?", max_new_tokens=4)
        stream.save(tmp_path / "memory.pt")
    finally:
        stream.close()
    again = Stream(smollm2, StreamConfig(**settings, keep_latest_per_camera=True))
    try:
        again.load(tmp_path / "memory.pt")
        _door_then_front(again, lines=12, door=False)
        assert again.held_fraction(*door) == 1.0
        # the door camera reports again: the new line is its newest and the old one may go
        newer = _door_then_front(again, lines=12)
        assert again.held_fraction(*newer) == 1.0
        if policy in ("window", "streamingllm"):
            assert again.held_fraction(*door) == 0.0
    finally:
        again.close()


def _save_a_short_memory(lm, config, path):
    """Four front lines after the door's, saved to ``path`` by a stream with ``config``."""
    plain = Stream(lm, config)
    try:
        _door_then_front(plain, lines=4)
        plain.save(path)
    finally:
        plain.close()


def test_unbiased_frames_mark_the_frames_tokens_through_evictions_answers_and_an_older_saved_state(smollm2, tmp_path):
    """``bias_frames=False``: the frame flag is set on frame lines only (not the system prompt, a question or
    the decoded answer), moves with its rows through evictions, and a memory saved with the paper's settings
    (the defaults before docs section 11c: no flag, no carried scores, no conversation clock) loads into such a
    stream and goes on, the clock read from the stream indices it holds."""
    settings = dict(policy="infmllm", budget_tokens=192, max_chunk_tokens=48)
    _save_a_short_memory(smollm2, StreamConfig(**settings, bias_frames=True, decay=0.0), tmp_path / "plain.pt")
    # (carry too decides only future evictions: a memory saved with the default "sum" loads)
    stream = Stream(smollm2, StreamConfig(**settings, decay=0.97, carry="max", bias_frames=False))
    try:
        stream.load(tmp_path / "plain.pt")
        layer = stream.cache.layers[0]
        assert not layer.held("frame").any()  # nothing known as a frame's in the old memory
        assert (layer.held("talk") == -1).all()  # and no token's clock yet
        seen = stream.stats().tokens_seen
        spans = []  # the frame lines' stream indices
        for i in range(16):
            before = stream.stats().tokens_seen
            stream.append_text(f"12:01:{i:02d} front: {i % 5} people in black (centre)", kind="frame",
                               camera="front")
            spans.append((before, stream.stats().tokens_seen))
        assert stream.cache.evictions > 0
        stream.ask("What did camera front see?", max_new_tokens=4)
        for layer in stream.cache.layers:
            held_seen, flag = layer.seen, layer.held("frame")
            in_a_line = torch.zeros_like(flag)
            for start, end in spans:
                in_a_line |= (held_seen >= start) & (held_seen < end)
            # every new token held is flagged exactly when it belongs to a frame line
            new = held_seen >= seen
            assert torch.equal(flag[new], in_a_line[new])
            assert flag[new].any() and not flag[new].all()  # frames and the question with its answer
            # the conversation clock, counted at the last eviction, never runs backwards along a head's rows
            # (arrival order); the rows that came after it (the question, the answer) wait for the next one
            talk = layer.held("talk")
            for head in talk.flatten(0, 1):
                counted = head[head >= 0]
                assert counted.numel() > 0 and (counted.diff() >= 0).all()
    finally:
        stream.close()


def test_keep_latest_per_camera_with_odd_names_and_across_saves_without_it(smollm2, tmp_path):
    settings = dict(policy="streamingllm", budget_tokens=192, max_chunk_tokens=48)
    stream = Stream(smollm2, StreamConfig(**settings, keep_latest_per_camera=True))
    try:
        # crc32("plumless") == crc32("buckeroo"): each camera still has a kept line of its own, and a lone
        # surrogate (a str Python allows) is a camera name like any other, not an error mid-append.
        spans = {}
        for camera in ("plumless", "buckeroo", "\ud800"):
            line = stream.append_text(f"12:00:00 cam: 1 person ({camera!r})", kind="frame", camera=camera)
            spans[camera] = (stream.stats().tokens_seen - line.tokens, stream.stats().tokens_seen)
        _door_then_front(stream, door=False)
        assert {c: stream.held_fraction(*span) for c, span in spans.items()} == dict.fromkeys(spans, 1.0)
        assert stream.stats().frames_seen == 3 + 24
    finally:
        stream.close()
    # A memory saved without the option (an older release, or the engine's default) loads into a stream
    # with it: the node's default changed, and its state file must not be set aside for that.
    _save_a_short_memory(smollm2, StreamConfig(**settings), tmp_path / "plain.pt")
    state = torch.load(tmp_path / "plain.pt", weights_only=True)
    state["config"].pop("keep_latest_per_camera", None)  # as an older release wrote it
    torch.save(state, tmp_path / "old.pt")
    for name in ("plain.pt", "old.pt"):
        pinned = Stream(smollm2, StreamConfig(**settings, keep_latest_per_camera=True))
        try:
            pinned.load(tmp_path / name)
            door = _door_then_front(pinned)  # kept from here on
            assert pinned.held_fraction(*door) == 1.0
        finally:
            pinned.close()
    other = Stream(smollm2, StreamConfig(**{**settings, "budget_tokens": 256}))
    try:
        with pytest.raises(ValueError, match=r"other stream settings .*'budget_tokens': \(192, 256\)"):
            other.load(tmp_path / "plain.pt")
    finally:
        other.close()


@pytest.mark.parametrize("policy", ["window", "streamingllm", "h2o", "infmllm"])
def test_a_small_budget_holds_over_a_stream_20x_longer(smollm2, emma_ids, policy):
    budget, chunk = 64, 16
    stream = _raw_stream(smollm2, policy=policy, budget_tokens=budget, max_chunk_tokens=chunk, recent=8,
                         retrieval_window=8, bias=0.5)
    bytes_per_token = stream.bytes_per_token
    try:
        for start in range(0, 20 * budget + chunk, chunk):
            result = stream.append_chunk(Chunk(input_ids=emma_ids[:, start : start + chunk]))
            assert result.tokens_held <= budget
            assert stream.cache.nbytes <= budget * bytes_per_token
            assert stream.cache.next_position <= budget + chunk
            assert all(layer.held("keys").shape[-2] == result.tokens_held for layer in stream.cache.layers)
            # the buffers were allocated once: budget + room, never regrown
            assert stream.cache.reserved_bytes == stream.capacity * bytes_per_token
        answer = stream.ask("Who is the story about?", max_new_tokens=8)
        stats = stream.stats()
    finally:
        stream.close()
    assert stats.tokens_seen > 20 * budget
    assert stats.tokens_held <= budget + chunk and stats.next_position <= budget + chunk
    assert stats.evictions >= 19 * budget
    assert answer.generated_tokens >= 1 and answer.text  # decoded text, not a claim that it is right


def test_rerotated_keys_equal_rope_applied_at_the_new_positions(smollm2, emma_ids):
    """Layer 0's key for a token depends on the token alone: recompute it and rotate at the kept position."""
    model = smollm2.model
    ids = emma_ids[:, :400]
    stream = _raw_stream(smollm2, policy="streamingllm", budget_tokens=48, max_chunk_tokens=16)
    try:
        for start in range(0, ids.shape[1], 16):
            stream.append_chunk(Chunk(input_ids=ids[:, start : start + 16]))
        layer = stream.cache.layers[0]
        assert stream.cache.next_position <= 48 + 16 < int(layer.seen.max()) + 1  # positions were compacted
        seen = layer.seen[0, 0]
        positions = layer.positions[0, 0, :, 0].long()
        attn = model.model.layers[0].self_attn
        with torch.inference_mode():
            hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:, seen]))
            k = attn.k_proj(hidden).view(1, seen.numel(), -1, attn.head_dim).transpose(1, 2)
            cos, sin = model.model.rotary_emb(hidden, positions.unsqueeze(0))
            _, expected = apply_rotary_pos_emb(k, k, cos, sin)
    finally:
        stream.close()
    torch.testing.assert_close(layer.held("keys"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_stream_longer_than_the_context_keeps_a_stable_perplexity(smollm2, emma_ids):
    # Past the model's 8192-token context, on contiguous positions. The 3x-context and
    # 32K-token runs, StreamingLLM beside us, are `infmllm-bench ppl` (docs/benchmarks.md
    # section 1): at 50K tokens this test took 3 min on a quiet CI machine and 15 on a busy one.
    context = int(smollm2.text_config.max_position_embeddings)
    segment = 1024
    tokens = context + 2 * segment
    assert emma_ids.shape[1] >= tokens
    stream = _raw_stream(smollm2, policy="infmllm", budget_tokens=256, max_chunk_tokens=128, recent=64)
    per_segment = []
    try:
        for start in range(0, tokens - segment + 1, segment):
            nll, count = _nll(stream, emma_ids[:, start : start + segment], 128)
            per_segment.append(math.exp(nll / count))
        assert stream.cache.next_position <= 256 + 128  # far below the context
        assert stream.stats().tokens_seen >= tokens > context
    finally:
        stream.close()
    assert all(math.isfinite(p) for p in per_segment), per_segment
    # Stable: the last third of the stream is no worse than 1.5x the first third.
    third = len(per_segment) // 3
    first, last = sum(per_segment[:third]) / third, sum(per_segment[-third:]) / third
    assert last < 1.5 * first, per_segment
    assert max(per_segment) < 200, per_segment


def test_frames_stamps_and_stats(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=160, max_chunk_tokens=48, recent=16))
    try:
        for i in range(40):
            stream.append_text(f"00:00:{i:02d} front: {i % 4} people, motion left\n", kind="frame",
                               camera="front" if i % 2 else "rear", stamp=100.0 + i)
        stats = stream.stats()
        assert stats.frames_seen == 40 and stats.cameras == {"front": 20, "rear": 20}
        assert stats.tokens_held <= 160 and stats.evictions > 0
        assert stats.newest_stamp == pytest.approx(139.0)
        assert 100.0 <= stats.oldest_stamp < 139.0
        answer = stream.ask("How many people were visible recently?", max_new_tokens=12)
        assert answer.newest_stamp == pytest.approx(139.0) and answer.oldest_stamp >= 100.0
        assert answer.prompt_tokens > 5 and answer.latency_s > 0
        # the conversation continues after the answer
        stream.append_text("00:00:41 front: 1 person, centre\n", kind="frame", camera="front", stamp=141.0)
        assert stream.stats().newest_stamp == pytest.approx(141.0)
        stream.reset()
        assert stream.stats().tokens_held == 0 and stream.stats().frames_seen == 0
    finally:
        stream.close()


def test_reported_frames_follow_stream_order_when_stamps_jump_back(smollm2):
    """A bag replayed in a loop and a second camera on another clock: the newest frame is the
    one appended last, the oldest the first one still held, per camera when asked about one."""
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=1024, max_chunk_tokens=64))
    try:
        front = [100.0, 101.0, 102.0, 103.0, 104.0, 100.0, 101.0]  # looped after 104
        rear = [5.0, 6.0, 7.0]  # a camera whose clock started at boot
        order = [("front", t) for t in front[:4]] + [("rear", rear[0]), ("front", front[4]),
                                                     ("rear", rear[1]), ("front", front[5]),
                                                     ("front", front[6]), ("rear", rear[2])]
        for camera, t in order:
            stream.append_text(f"{camera}: 1 person, left\n", kind="frame", camera=camera, stamp=t)
        stats = stream.stats()
        assert stats.evictions == 0
        assert (stats.oldest_stamp, stats.newest_stamp) == (100.0, 7.0)  # first and last appended
        answer = stream.ask("What did the front camera see last?", camera="front", max_new_tokens=4)
        assert (answer.oldest_stamp, answer.newest_stamp) == (100.0, 101.0)  # not max(front) = 104
        answer = stream.ask("What did the rear camera see?", camera="rear", max_new_tokens=4)
        assert (answer.oldest_stamp, answer.newest_stamp) == (5.0, 7.0)
        stream.append_text("front: 2 people, right\n", kind="frame", camera="front", stamp=50.0)
        assert stream.ask("And now?", max_new_tokens=4).newest_stamp == 50.0
    finally:
        stream.close()

    # Once evictions start, the oldest is the first frame still held, in stream order: after a
    # loop, a frame of the first pass (whole seconds) that survived, not the second pass's 200.5.
    stream = Stream(smollm2, StreamConfig(policy="streamingllm", budget_tokens=96, max_chunk_tokens=32,
                                          sinks=4, recent=16))
    try:
        stamps = [200.0 + i for i in range(10)] + [200.5 + i for i in range(4)]
        for t in stamps:
            stream.append_text(f"front: {int(t) % 4} people, motion left\n", kind="frame", camera="front",
                               stamp=t)
        stats = stream.stats()
        assert stats.evictions > 0 and stats.newest_stamp == 203.5
        assert stats.oldest_stamp.is_integer() and 200.0 < stats.oldest_stamp <= 209.0, stats.oldest_stamp
    finally:
        stream.close()


def test_ask_can_be_cancelled_and_streams_text(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=256, max_chunk_tokens=64))
    pieces = []
    try:
        stream.append_text("12:00:00 front: 2 people, left\n", kind="frame", camera="front", stamp=1.0)
        calls = iter(range(100))
        answer = stream.ask("Describe the scene.", max_new_tokens=30, should_stop=lambda: next(calls) >= 3,
                            on_text=pieces.append)
    finally:
        stream.close()
    # should_stop is asked once before the question's one piece, then before each token.
    assert answer.cancelled and answer.generated_tokens == 2
    assert "".join(pieces).strip() == answer.text


def test_a_long_prefill_stops_between_pieces_and_the_stream_goes_on(smollm2, emma_ids):
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=256, max_chunk_tokens=32))
    try:
        stream.append_text("12:00:00 front: 2 people, left\n", kind="frame", camera="front", stamp=1.0)
        before = stream.stats().tokens_seen
        checks = iter(range(1000))
        with pytest.raises(Cancelled) as stop:
            stream.append_chunk(Chunk(input_ids=emma_ids[:, :200], kind="text"),
                                should_stop=lambda: next(checks) >= 3)
        assert (stop.value.appended, stop.value.total) == (96, 200)
        assert stream.stats().tokens_seen == before + 96

        long_question = "Was there " + "a person, " * 25 + "or not?"  # 3 pieces, within the question room
        checks = iter(range(1000))
        answer = stream.ask(long_question, max_new_tokens=8, should_stop=lambda: next(checks) >= 2)
        assert answer.cancelled and answer.generated_tokens == 0 and answer.text == ""
        assert stream.stats().tokens_seen == before + 96 + 64

        # The stream is still a working conversation: more frames, then a full answer.
        stream.append_text("12:00:05 front: 1 person, right\n", kind="frame", camera="front", stamp=5.0)
        answer = stream.ask("How many people?", max_new_tokens=4)
        assert not answer.cancelled and answer.generated_tokens >= 1
    finally:
        stream.close()


def test_save_and_load_restore_the_same_next_prediction(smollm2, emma_ids, tmp_path):
    settings = dict(policy="h2o", budget_tokens=96, max_chunk_tokens=32)
    first = _raw_stream(smollm2, **settings)
    try:
        for start in range(0, 320, 32):
            first.append_chunk(Chunk(input_ids=emma_ids[:, start : start + 32]))
        first.save(tmp_path / "stream.pt")
        expected = first.append_chunk(Chunk(input_ids=emma_ids[:, 320:352]), return_logits=True).logits
    finally:
        first.close()
    second = Stream(smollm2, StreamConfig(**settings))
    try:
        second.load(tmp_path / "stream.pt")
        got = second.append_chunk(Chunk(input_ids=emma_ids[:, 320:352]), return_logits=True).logits
        other = Stream(smollm2, StreamConfig(policy="h2o", budget_tokens=64, max_chunk_tokens=32))
        try:
            with pytest.raises(ValueError, match="other stream settings"):
                other.load(tmp_path / "stream.pt")
        finally:
            other.close()
    finally:
        second.close()
    torch.testing.assert_close(got, expected)


def test_bad_input_gets_a_clear_error(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=128, max_chunk_tokens=32, recent=8))
    try:
        with pytest.raises(ValueError, match="empty"):
            stream.append_text("   ")
        with pytest.raises(ValueError, match="empty chunk"):
            Chunk(input_ids=torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match="integers"):
            stream.append_chunk(Chunk(input_ids=torch.zeros(1, 4, dtype=torch.float32)))
        with pytest.raises(ValueError, match="vocabulary"):
            stream.append_chunk(Chunk(input_ids=torch.tensor([[10**7]])))
        with pytest.raises(ValueError, match="width"):
            stream.append_chunk(Chunk(inputs_embeds=torch.zeros(1, 3, 7)))
        with pytest.raises(ValueError, match="NaN"):
            stream.append_chunk(Chunk(inputs_embeds=torch.full((1, 3, 576), float("nan"))))
        with pytest.raises(ValueError, match="empty question"):
            stream.ask("")
        with pytest.raises(ValueError, match="max_new_tokens"):
            stream.ask("Anything?", max_new_tokens=10_000)
        # an over-long text is split into pieces that each fit a chunk
        long_text = "The robot saw a red box on the table. " * 40
        result = stream.append_text(long_text)
        assert result.pieces > 1 and result.tokens_held <= 128
    finally:
        stream.close()
    with pytest.raises(ValueError, match="no room"):
        Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=60, sinks=4, recent=60))
    with pytest.raises(ValueError, match="unknown cache policy"):
        StreamConfig(policy="lru").validate()
    with pytest.raises(ValueError, match="unknown stream settings"):
        StreamConfig.from_dict({"budget": 3})
    with pytest.raises(ValueError, match="holds no token"):
        Stream(smollm2, StreamConfig(policy="window", budget_tokens=0, budget_bytes=10))


@pytest.mark.parametrize("settings", [
    {"retrieval_window": 2.5}, {"retrieval_window": float("nan")}, {"max_chunk_tokens": "32"},
    {"max_chunk_tokens": 2.5}, {"per_head": "no"}, {"rerotate": "no"}, {"system_prompt": None},
    {"policy": ["infmllm"]}, {"budget_tokens": True}, {"bias": "1"}, {"decay": None}])
def test_a_setting_of_the_wrong_type_is_named_before_the_stream_is_built(settings):
    # Each of these once passed validate() and failed later: at the first eviction (a slice by 2.5), at the first
    # long text (a comparison with "32"), or never ("no" is truthy: the option stayed on; None became the text
    # "None").
    name = next(iter(settings))
    with pytest.raises(ValueError, match=name):
        StreamConfig(**{"policy": "infmllm", "budget_tokens": 128, **settings}).validate()


def test_a_bad_chunk_or_answer_length_is_refused_before_the_stream_changes(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=128, max_chunk_tokens=32, recent=8,
                                          keep_latest_per_camera=True))
    try:
        stream.append_text("12:00:00 front: 1 person, left", kind="frame", camera="front", stamp=0.0)
        before = stream.stats()
        for bad in (dict(camera=None), dict(camera=7), dict(stamp="noon"), dict(stamp=float("nan"))):
            with pytest.raises(ValueError, match="camera|stamp"):
                Chunk(input_ids=torch.tensor([[1, 2, 3]]), kind="frame", **{"camera": "door", **bad})
        with pytest.raises(ValueError, match="torch.Tensor"):
            Chunk(input_ids=[[1, 2, 3]])
        # Finite in float64, infinite in the model's float32: refused as the model would read it.
        with pytest.raises(ValueError, match="NaN or inf"):
            stream.append_chunk(Chunk(inputs_embeds=torch.full((1, 3, 576), 1e300, dtype=torch.float64)))
        for count in (2.5, "3", None, True):
            with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
                stream.ask("How many people?", max_new_tokens=count)
        assert "integer" in stream.check_question("How many people?", float("inf"))
        with pytest.raises(ValueError, match="max_new_tokens"):
            stream.generate(torch.zeros(int(smollm2.text_config.vocab_size)), 2.5)
        assert stream.stats() == before  # nothing of the refused calls got in
        assert stream.ask("How many people?", max_new_tokens=2).generated_tokens >= 1
    finally:
        stream.close()


def test_full_with_a_cap_below_its_system_prompt_is_refused_and_stays_empty(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="full", budget_tokens=20))
    try:
        for _ in range(2):  # the second append once went in without the system prompt
            with pytest.raises(ValueError, match="full cache holds at most 20"):
                stream.append_text("hello")
            assert stream.stats().tokens_seen == 0
    finally:
        stream.close()


def test_a_file_that_is_not_a_saved_stream_or_does_not_fit_leaves_the_stream_as_it_was(smollm2, tmp_path):
    settings = dict(policy="infmllm", budget_tokens=96, max_chunk_tokens=32, recent=8)
    stream = Stream(smollm2, StreamConfig(**settings))
    try:
        stream.append_text("12:00:00 front: 2 people, left", kind="frame", camera="front", stamp=0.0)
        stream.save(tmp_path / "good.pt")
        stream.append_text("12:00:01 hall: 1 person, right", kind="frame", camera="hall", stamp=1.0)
        state = torch.load(tmp_path / "good.pt", weights_only=True)
        (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
        (tmp_path / "empty.pt").write_bytes(b"")
        torch.save({"format": 2}, tmp_path / "keys.pt")
        torch.save({**state, "cache": {**state["cache"], "length": 10**6}}, tmp_path / "long.pt")
        torch.save({**state, "records": [{"x": 1}]}, tmp_path / "records.pt")
        torch.save({**state, "frames_seen": "many"}, tmp_path / "counts.pt")
        layers = [dict(layer) if layer else layer for layer in state["layers"]]
        layers[5]["seen"] = 7  # a per-token buffer that is not a tensor: fails while the rows are written
        torch.save({**state, "layers": layers}, tmp_path / "buffer.pt")
        before = stream.stats()
        probe = stream.snapshot()
        expected = stream.append_text("12:00:02 front: 3 people", return_logits=True).logits
        stream.restore(probe)
        for name in ("garbage", "empty", "keys", "long", "records", "counts", "buffer"):
            with pytest.raises(ValueError, match="saved stream|does not fit"):
                stream.load(tmp_path / f"{name}.pt")
            assert stream.stats() == before, name
        # the stream is the one it was, to the bit, and still a conversation
        got = stream.append_text("12:00:02 front: 3 people", return_logits=True).logits
        assert torch.equal(got, expected)
        stream.load(tmp_path / "good.pt")
        assert stream.stats().frames_seen == 1
    finally:
        stream.close()


def test_byte_budget_is_converted_to_tokens(smollm2):
    one_token = 2 * 3 * 64 * 4 * 30  # keys+values, 3 KV heads, head_dim 64, fp32, 30 layers
    stream = Stream(smollm2, StreamConfig(policy="streamingllm", budget_tokens=0, budget_bytes=100 * one_token,
                                          max_chunk_tokens=32))
    try:
        assert stream.bytes_per_token == one_token
        # the byte budget holds 100 tokens: 32 of room for a chunk, 68 kept after each eviction
        assert (stream.budget, stream.capacity) == (68, 100)
    finally:
        stream.close()
    per_layer = Stream(smollm2, StreamConfig(policy="streamingllm", budget_tokens=500,
                                             budget_bytes_per_layer=80 * one_token // 30, max_chunk_tokens=32))
    per_layer.close()
    assert (per_layer.budget, per_layer.capacity) == (48, 80)


def test_closing_one_stream_keeps_the_cap_of_another_on_the_same_model(smollm2, emma_ids):
    attention = smollm2.model.model.layers[0].self_attn
    users_before = getattr(attention, "_infmllm_users", 0)
    first = _raw_stream(smollm2, policy="streamingllm", budget_tokens=32, max_chunk_tokens=16)
    second = _raw_stream(smollm2, policy="streamingllm", budget_tokens=32, max_chunk_tokens=16)
    first.close()
    first.close()  # idempotent
    try:
        for start in range(0, 96, 16):
            held = second.append_chunk(Chunk(input_ids=emma_ids[:, start : start + 16])).tokens_held
            assert held <= 32
    finally:
        second.close()
    assert getattr(attention, "_infmllm_users", 0) == users_before
    if users_before == 0:  # no other stream alive: the model is back on its own attention
        assert smollm2.model.config._attn_implementation == "sdpa"


def _held(stream):
    """Copies of every layer's held rows (keys, values and every per-token buffer) and the cache's counters."""
    cache = stream.cache
    rows = [{name: layer.held(name).clone() for name in ("keys", "values", *layer.buffers)} for layer in cache.layers]
    return rows, (cache.length, cache.next_position, cache.tokens_seen, cache.evictions, cache.chunks_begun)


@pytest.mark.parametrize("extra", [dict(policy="infmllm", decay=0.5, granularity="chunk"), dict(policy="h2o")],
                         ids=["infmllm-decay-chunk", "h2o"])
def test_a_probe_between_snapshot_and_restore_leaves_no_trace(smollm2, emma_ids, extra):
    """What a benchmark's probe question relies on: after restore the stream predicts as if never asked, and
    its static cache holds exactly what it held (keys, per-token buffers, positions, counters)."""
    settings = dict(budget_tokens=96, max_chunk_tokens=32, recent=8, retrieval_window=8, **extra)
    probed, plain = Stream(smollm2, StreamConfig(**settings)), Stream(smollm2, StreamConfig(**settings))
    try:
        for stream in (probed, plain):
            for k in range(8):
                stream.append_text(f"12:00:0{k} front: {k + 1} people, left\n", kind="frame", camera="front",
                                   stamp=float(k))
        assert probed.stats().evictions > 0  # the cache is full: the probe below evicts and compacts
        before, counters = _held(probed)
        buffers = {"infmllm": {"carried", "chunk"}, "h2o": {"accumulated"}}[extra["policy"]]
        assert buffers <= set(before[0])
        saved = probed.snapshot()
        for attempt in range(2):  # a snapshot can be restored more than once
            evictions = probed.stats().evictions
            answer = probed.ask("How many people did camera front see at 12:00:02?", max_new_tokens=4,
                                answer_prefix="12:00:02 front: ", return_first_logits=True)
            assert answer.first_logits.shape == (smollm2.text_config.vocab_size,)
            first = smollm2.tokenizer.decode([int(answer.first_logits.argmax())])
            assert answer.text.startswith(first.strip())  # the answer continues the prefix from those logits
            assert probed.stats().tokens_seen > plain.stats().tokens_seen
            assert probed.stats().evictions > evictions
            probed.restore(saved)
            assert probed.stats() == plain.stats()
            after, after_counters = _held(probed)
            assert after_counters == counters
            for layer_before, layer_after in zip(before, after):
                assert set(layer_before) == set(layer_after)
                for name in layer_before:
                    assert torch.equal(layer_before[name], layer_after[name]), name
        with pytest.raises(ValueError, match="snapshot of this stream"):
            plain.restore(saved)
        tail = Chunk(input_ids=emma_ids[:, :40], kind="text")
        a = probed.append_chunk(tail, return_logits=True).logits
        b = plain.append_chunk(tail, return_logits=True).logits
        torch.testing.assert_close(a, b)
        assert _held(probed)[1] == _held(plain)[1]
    finally:
        probed.close()
        plain.close()
