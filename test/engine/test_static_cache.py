"""The static-shape cache and the lean answer loop on the real SmolLM2-135M-Instruct.

Buffers allocated once and written in place, a byte budget that is never
passed (room for the answer included), ``full`` that refuses to grow past its
budget or the model's context, questions bounded in tokens, logits only where
they are used, a failed forward that changes nothing, and a saved state that
loads into a stream of another dtype.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from infmllm_ros.bench.common import raw_stream
from infmllm_ros.engine import Chunk, IncrementalDetokenizer, LoadedModel, Stream, StreamConfig

pytestmark = pytest.mark.model

FRAME = "12:00:{:02d} front: {} people (left, centre), strong motion left, mostly grey\n"


def _raw(lm, **settings) -> Stream:
    """A stream without the chat framing: token i of the text is stream token i."""
    return raw_stream(lm, StreamConfig(**settings))


def _frames(stream, n, start=0):
    for i in range(start, start + n):
        stream.append_text(FRAME.format(i % 60, i % 5), kind="frame", camera="front", stamp=float(i))


def _state(stream) -> dict:
    """Everything the cache holds, per layer, plus its counters (copies)."""
    c = stream.cache
    layers = [{name: layer.held(name).clone() for name in ("keys", "values", *layer.buffers)}
              for layer in c.layers]
    return {"layers": layers, "counters": (c.length, c.next_position, c.tokens_seen, c.evictions)}


def _assert_same_state(a: dict, b: dict, rerotated: bool = False) -> None:
    """Same tokens, values and per-token state in every layer. ``rerotated``: keys and positions may
    differ by the re-rotation that closes position gaps before a step (not part of the step itself)."""
    skip = ("keys", "positions") if rerotated else ()
    assert a["counters"][0] == b["counters"][0] and a["counters"][2:] == b["counters"][2:]
    if not rerotated:
        assert a["counters"][1] == b["counters"][1]
    for la, lb in zip(a["layers"], b["layers"]):
        assert la.keys() == lb.keys()
        for name in la:
            if name not in skip:
                assert torch.equal(la[name], lb[name]), name


def test_buffers_are_allocated_once_and_written_in_place(smollm2, emma_ids):
    stream = _raw(smollm2, policy="infmllm", budget_tokens=64, max_chunk_tokens=16, recent=8, retrieval_window=8)
    try:
        stream.append_chunk(Chunk(input_ids=emma_ids[:, :16]))
        addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in stream.cache.layers]
        reserved = stream.cache.reserved_bytes
        assert reserved == stream.capacity * stream.bytes_per_token == (64 + 16 + 16) * stream.bytes_per_token
        for start in range(16, 8 * 64, 16):
            stream.append_chunk(Chunk(input_ids=emma_ids[:, start:start + 16]))
        stream.ask("Who is the story about?", max_new_tokens=6)
        assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in stream.cache.layers] == addresses
        assert stream.cache.reserved_bytes == reserved
        assert stream.stats().evictions > 0
    finally:
        stream.close()


@pytest.mark.parametrize("policy", ["infmllm", "h2o", "streamingllm"])
def test_a_byte_budget_is_never_passed_not_even_while_an_answer_is_decoded(smollm2, policy):
    one_token = 2 * 3 * 64 * 4 * 30
    budget_bytes = 200 * one_token
    stream = Stream(smollm2, StreamConfig(policy=policy, budget_tokens=0, budget_bytes=budget_bytes,
                                          max_chunk_tokens=32, recent=16, retrieval_window=16))
    seen_bytes, seen_tokens = [], []

    def watch(_piece=None):
        st = stream.stats()
        seen_bytes.append(max(st.bytes_held, st.bytes_reserved))
        seen_tokens.append(st.tokens_held)
        assert st.tokens_held <= st.capacity_tokens and st.budget_bytes == budget_bytes

    try:
        assert stream.capacity * one_token <= budget_bytes
        for round_ in range(3):
            for i in range(4):
                _frames(stream, 1, start=10 * round_ + i)
                watch()
            answer = stream.ask("How many people were visible recently, and where?", max_new_tokens=12,
                                on_text=watch)
            watch()
            assert answer.generated_tokens >= 1
    finally:
        stream.close()
    assert max(seen_bytes) <= budget_bytes
    assert max(seen_tokens) <= stream.capacity
    if policy == "infmllm":
        assert max(seen_tokens) > stream.budget  # the answer's room was used, inside the byte budget


def test_full_with_a_budget_refuses_to_grow_past_it(smollm2, emma_ids):
    stream = _raw(smollm2, policy="full", budget_tokens=100, max_chunk_tokens=32)
    try:
        assert stream.stats().budget_tokens == 100 == stream.stats().capacity_tokens
        for start in range(0, 96, 32):
            stream.append_chunk(Chunk(input_ids=emma_ids[:, start:start + 32]))
        before = stream.stats().tokens_seen
        with pytest.raises(ValueError, match="full cache holds at most 100 tokens"):
            stream.append_chunk(Chunk(input_ids=emma_ids[:, 96:128]))
        assert stream.stats().tokens_held == 96 and stream.stats().tokens_seen == before  # nothing appended
        assert stream.check_question("Who is it about?", 8).startswith("question too long")
        stream.append_chunk(Chunk(input_ids=emma_ids[:, 96:100]))  # what fits still goes in
        assert stream.stats().tokens_held == 100
    finally:
        stream.close()


def test_full_without_a_budget_refuses_to_pass_the_models_context(smollm2, emma_ids, monkeypatch):
    monkeypatch.setattr(smollm2.text_config, "max_position_embeddings", 80)
    stream = _raw(smollm2, policy="full", budget_tokens=0, max_chunk_tokens=32)
    monkeypatch.undo()
    try:
        assert stream.capacity == 80
        stream.append_chunk(Chunk(input_ids=emma_ids[:, :64]))
        with pytest.raises(ValueError, match="model's context"):
            stream.append_chunk(Chunk(input_ids=emma_ids[:, 64:96]))
        assert stream.stats().tokens_held == 64
    finally:
        stream.close()


def test_a_question_that_would_push_the_frames_out_is_refused_with_what_fits(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="streamingllm", budget_tokens=256, max_chunk_tokens=64))
    try:
        _frames(stream, 12)
        before = stream.stats()
        long_question = "Was anyone there? " + "\U0001F600" * 200  # ~600 tokens in 218 characters
        reason = stream.check_question(long_question, 16)
        assert reason is not None and reason.startswith("question too long")
        fits = stream.question_room(16)
        assert f"at most {fits} fit" in reason and 0 < fits < 128
        with pytest.raises(ValueError, match="question too long"):
            stream.ask(long_question, max_new_tokens=16)
        after = stream.stats()
        assert (after.tokens_seen, after.oldest_stamp, after.newest_stamp) == \
            (before.tokens_seen, before.oldest_stamp, before.newest_stamp)
        assert stream.check_question("How many people?", 16) is None
        answer = stream.ask("How many people?", max_new_tokens=8)
        assert answer.generated_tokens >= 1 and answer.oldest_stamp is not None
    finally:
        stream.close()


def test_only_the_logits_that_are_used_are_computed(smollm2):
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=256, max_chunk_tokens=32))
    rows = []
    hook = smollm2.model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[-2]))
    try:
        _frames(stream, 6)
        question = "Which people were seen on the left side of the picture, and what did they do there?" * 2
        assert len(stream._question_prompt(question, "")[0]) > 32  # more than one piece
        rows.clear()
        answer = stream.ask(question, max_new_tokens=5)
    finally:
        hook.remove()
        stream.close()
    assert answer.generated_tokens >= 1
    assert rows and max(rows) <= 1  # never the question's every position
    assert sum(rows) <= answer.generated_tokens + 1  # the question's last row, then one per answer token


def test_a_failed_forward_in_a_middle_layer_changes_nothing(smollm2, emma_ids):
    settings = dict(policy="h2o", budget_tokens=64, max_chunk_tokens=16)
    stream = _raw(smollm2, **settings)
    twin = _raw(smollm2, **settings)
    middle = smollm2.model.model.layers[15].mlp

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in layer 15")

    try:
        for start in range(0, 128, 16):
            stream.append_chunk(Chunk(input_ids=emma_ids[:, start:start + 16]))
            twin.append_chunk(Chunk(input_ids=emma_ids[:, start:start + 16]))
        before = _state(stream)
        middle.forward = broken
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                stream.append_chunk(Chunk(input_ids=emma_ids[:, 128:144]))
        finally:
            del middle.forward
        _assert_same_state(_state(stream), before, rerotated=True)
        # and the stream goes on exactly like one that never failed
        got = stream.append_chunk(Chunk(input_ids=emma_ids[:, 128:144]), return_logits=True).logits
        expected = twin.append_chunk(Chunk(input_ids=emma_ids[:, 128:144]), return_logits=True).logits
        torch.testing.assert_close(got, expected)
        _assert_same_state(_state(stream), _state(twin))
    finally:
        stream.close()
        twin.close()


def test_a_state_saved_in_float32_loads_into_a_bfloat16_stream(smollm2, tmp_path):
    settings = dict(policy="infmllm", budget_tokens=128, max_chunk_tokens=32, recent=16)
    first = Stream(smollm2, StreamConfig(**settings))
    try:
        _frames(first, 10)
        first.save(tmp_path / "memory.pt")
        held = first.stats().tokens_held
        # the held rows only, not the whole preallocated buffers
        assert (tmp_path / "memory.pt").stat().st_size <= 1.1 * first.stats().bytes_held + 256 * 1024
    finally:
        first.close()
    half = LoadedModel(model=copy.deepcopy(smollm2.model).to(torch.bfloat16), tokenizer=smollm2.tokenizer,
                       name=smollm2.name)
    second = Stream(half, StreamConfig(**settings))
    try:
        with pytest.warns(UserWarning, match="converted to this stream's bfloat16"):
            second.load(tmp_path / "memory.pt")
        assert second.stats().tokens_held == held
        assert all(layer.held("keys").dtype == torch.bfloat16 for layer in second.cache.layers)
        answer = second.ask("How many people were visible recently?", max_new_tokens=6)
        _frames(second, 2, start=10)
        assert answer.generated_tokens >= 1
        assert len({layer.held("keys").shape[-2] for layer in second.cache.layers}) == 1
    finally:
        second.close()


def test_a_corrupt_state_is_refused_and_the_stream_stays_as_it_was(smollm2, tmp_path):
    settings = dict(policy="streamingllm", budget_tokens=96, max_chunk_tokens=32)
    stream = Stream(smollm2, StreamConfig(**settings))
    try:
        _frames(stream, 6)
        stream.save(tmp_path / "memory.pt")
        state = torch.load(tmp_path / "memory.pt", weights_only=True)
        layer = state["layers"][7]
        for name in layer:
            layer[name] = layer[name][:, :, :-1]  # one layer one token short
        torch.save(state, tmp_path / "corrupt.pt")
        _frames(stream, 2, start=6)
        before = _state(stream)
        with pytest.raises(ValueError, match="different token counts"):
            stream.load(tmp_path / "corrupt.pt")
        _assert_same_state(_state(stream), before)
    finally:
        stream.close()


def test_incremental_detokenisation_gives_the_whole_text_piece_by_piece(smollm2):
    text = "Two people, 二人が左に立っている 😀 then one café\n"
    ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(smollm2.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == smollm2.tokenizer.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)  # a split character is held until it is whole


def test_an_answer_ends_where_it_starts_writing_a_stop_text(smollm2):
    # A 135M model asked about its observations sometimes goes on to write the next
    # "Question: ..." itself; ask() ends the answer there. Checked with a stop text the
    # model's own free answer contains: the answer is cut before it and holds fewer tokens.
    stream = Stream(smollm2, StreamConfig(policy="infmllm", budget_tokens=512, max_chunk_tokens=128, recent=32))
    try:
        stream.append_text("22:13:20 front: 3 people in black (2 centre, right), 1 white truck (right)\n",
                           kind="frame", camera="front", stamp=1.0)
        logits = stream.append_text("Question: What did the front camera see? Answer in one sentence.\n",
                                    kind="question", return_logits="last").logits[-1]
        before = stream.snapshot()
        free = stream.generate(logits.clone(), 24, stop_at_eos=False)
        held_free = stream.stats().tokens_held
        words = free.text.split()
        assert len(words) >= 3, free.text
        stop = " " + words[2]
        stream.restore(before)
        pieces = []
        cut = stream.generate(logits.clone(), 24, stop_at_eos=False, stop_texts=(stop,), on_text=pieces.append)
        assert cut.text == free.text[:free.text.find(stop)] == "".join(pieces)
        assert len(cut.tokens) < len(free.tokens)
        assert stream.stats().tokens_held < held_free  # what came after the stop was never appended
    finally:
        stream.close()
