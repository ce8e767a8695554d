"""VlmEncoder on random-init VLMs of the real classes (Qwen2.5-VL with M-RoPE, Idefics3/SmolVLM with 1-D RoPE).

The weights are random, so nothing here says an answer is right: the tests pin
down token counts, the budget, and that streaming frames through the capped
cache computes exactly what the model's own un-streamed forward pass computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infmllm_ros.engine import POLICIES, Stream, StreamConfig
from infmllm_ros.engine.models import LoadedModel
from infmllm_ros.perception.encoders import ENCODERS, make_encoder
from infmllm_ros.perception.frames import FrameError
from infmllm_ros.perception.vlm import VlmEncoder

pytestmark = pytest.mark.model  # the fixtures take SmolLM2's tokenizer from the real model

STAMP = 1_700_000_000.0  # 22:13:20 UTC
EVICTING = sorted(name for name, cls in POLICIES.items() if cls.evicts)


def _frames(n: int, size=(112, 112), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(n)]


def _raw_stream(lm, **settings) -> Stream:
    """A stream that skips the chat framing, so the chunks are the whole sequence."""
    stream = Stream(lm, StreamConfig(**settings))
    stream._started = stream._in_user_turn = True
    return stream


def _image_tokens(encoder: VlmEncoder, frame: np.ndarray) -> int:
    ids = encoder.processor_inputs([frame], ["front"], [STAMP])[0]["input_ids"]
    return int((ids == encoder.image_token_id).sum())


FIXTURE = {"qwen2_5_vl": "tiny_qwen25vl", "idefics3": "tiny_idefics3"}


@pytest.fixture(scope="module", params=sorted(FIXTURE))
def family(request):
    return request.param, request.getfixturevalue(FIXTURE[request.param])


def _thirty_chunks(lm):
    """30 frames from two cameras, one second apart (every third from the rear camera)."""
    cameras = ["front" if i % 3 else "rear" for i in range(30)]
    return VlmEncoder.from_model(lm).encode_batch(_frames(30, seed=1), cameras, [STAMP + i for i in range(30)])


@pytest.fixture(scope="module")
def thirty_chunks(family):
    return _thirty_chunks(family[1])


# -- (a) tokens per frame --------------------------------------------------------------------------------------

def test_qwen_112px_frame_is_16_merged_tokens_plus_the_marker(tiny_qwen25vl):
    encoder = make_encoder("vlm", tiny_qwen25vl)
    assert isinstance(encoder, VlmEncoder) and ENCODERS["vlm"] is VlmEncoder
    chunk = encoder.encode(_frames(1)[0], "front", STAMP)
    tok = tiny_qwen25vl.tokenizer
    marker = len(tok("22:13:20 front: ", add_special_tokens=False)["input_ids"]) + 2 + 1  # + start/end + "\n"
    assert len(chunk) == 16 + marker
    assert chunk.inputs_embeds.shape == (1, 16 + marker, tiny_qwen25vl.text_config.hidden_size)
    assert (chunk.kind, chunk.camera, chunk.stamp) == ("frame", "front", STAMP)
    assert chunk.text == "22:13:20 front: <image>\n"
    # M-RoPE positions for the chunk alone: text 0..k-1, a 4x4 grid at t=k, then text from k+4.
    pos = chunk.rope_positions
    assert pos.shape == (3, 1, len(chunk)) and pos.dtype == torch.long
    start = marker - 2  # tokens before the grid: the text and <|vision_start|>
    assert pos[:, 0, :start].tolist() == [list(range(start))] * 3
    grid = pos[:, 0, start : start + 16]
    assert grid[0].tolist() == [start] * 16
    assert grid[1].tolist() == [start + r for r in range(4) for _ in range(4)]
    assert grid[2].tolist() == [start + c for _ in range(4) for c in range(4)]
    assert pos[:, 0, start + 16 :].tolist() == [[start + 4, start + 5]] * 3
    assert int(pos.max()) + 1 == len(chunk) - 12  # the span the stream advances by


def test_qwen_token_count_follows_the_pixel_options(tiny_qwen25vl):
    frame = _frames(1)[0]
    assert _image_tokens(VlmEncoder.from_model(tiny_qwen25vl, max_pixels=56 * 56), frame) == 4
    assert _image_tokens(VlmEncoder.from_model(tiny_qwen25vl, image_size=224), frame) == 64
    wide = _frames(1, size=(112, 224))[0]
    assert _image_tokens(VlmEncoder.from_model(tiny_qwen25vl, image_size=224), wide) == 32
    assert _image_tokens(VlmEncoder.from_model(tiny_qwen25vl, min_pixels=224 * 224, max_pixels=224 * 224), frame) == 64
    with pytest.raises(ValueError, match="min_pixels"):
        VlmEncoder.from_model(tiny_qwen25vl, min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 0"):
        VlmEncoder.from_model(tiny_qwen25vl, max_pixels=-1)
    # The node passes 0 for "the processor's default" (config/models/*.yaml, ros/params.py).
    assert _image_tokens(VlmEncoder.from_model(tiny_qwen25vl, image_size=0, min_pixels=0, max_pixels=0), frame) == 16


def test_idefics3_frame_is_image_seq_len_tokens(tiny_idefics3):
    encoder = VlmEncoder.from_model(tiny_idefics3, min_pixels=1, max_pixels=2)  # Qwen-only options: ignored
    assert encoder.image_seq_len == tiny_idefics3.processor.image_seq_len == 16
    for size in ((112, 112), (480, 640), (37, 300)):  # every frame is squashed to one square
        frame = _frames(1, size=size)[0]
        chunk = encoder.encode(frame, "front", STAMP)
        assert _image_tokens(encoder, frame) == 16
        assert chunk.rope_positions is None and chunk.kind == "frame"
    # <fake_token_around_image> <global-img> 16 x <image> <fake_token_around_image>, between the marker's text.
    tok = tiny_idefics3.tokenizer
    marker = len(tok("22:13:20 front: ", add_special_tokens=False)["input_ids"]) + 3 + 1
    assert len(chunk) == 16 + marker
    assert VlmEncoder.from_model(tiny_idefics3, image_size=0).image_size == 128  # 0: the processor's default
    small = VlmEncoder.from_model(tiny_idefics3, image_size=64)
    assert small.image_seq_len == 4 and len(small.encode(frame, "front", STAMP)) == 4 + marker
    with pytest.raises(ValueError, match="multiple of 32"):
        VlmEncoder.from_model(tiny_idefics3, image_size=100)
    with pytest.raises(ValueError, match="at most 128"):
        VlmEncoder.from_model(tiny_idefics3, image_size=256)


def test_a_batch_is_one_vision_pass_with_the_same_result(family):
    _, lm = family
    encoder = VlmEncoder.from_model(lm)
    frames = _frames(3, seed=2)
    batch = encoder.encode_batch(frames, ["a", "b", "c"], [STAMP, STAMP + 1, None])
    for frame, camera, stamp, got in zip(frames, ["a", "b", "c"], [STAMP, STAMP + 1, None], batch):
        one = encoder.encode(frame, camera, stamp)
        torch.testing.assert_close(got.inputs_embeds, one.inputs_embeds, rtol=1e-5, atol=1e-5)
        assert got.camera == camera
    assert batch[2].text.startswith("c: ")  # no stamp, no time
    assert encoder.encode_batch([], [], []) == []
    with pytest.raises(ValueError, match="3 frames, 2 cameras"):
        encoder.encode_batch(frames, ["a", "b"], [STAMP] * 3)


def test_from_model_refuses_a_text_model_or_a_missing_processor(smollm2, tiny_qwen25vl):
    with pytest.raises(ValueError, match="vision"):
        VlmEncoder.from_model(smollm2)
    with pytest.raises(ValueError, match="processor"):
        VlmEncoder.from_model(LoadedModel(model=tiny_qwen25vl.model, tokenizer=tiny_qwen25vl.tokenizer))


# -- (b) a small budget over many frames ----------------------------------------------------------------------

@pytest.mark.parametrize("policy", EVICTING)
def test_a_budget_of_three_frames_holds_over_thirty(family, thirty_chunks, policy):
    name, lm = family
    per_frame = len(thirty_chunks[0])
    budget, max_chunk = 3 * per_frame + 8, 64
    stream = Stream(lm, StreamConfig(policy=policy, budget_tokens=budget, max_chunk_tokens=max_chunk, recent=16,
                                     retrieval_window=16, bias=0.5))
    try:
        for chunk in thirty_chunks:
            result = stream.append_chunk(chunk)
            assert result.tokens_held <= budget
            assert stream.cache.next_position <= budget + max_chunk
        answer = stream.ask("What did the front camera see?", max_new_tokens=8)
        stats = stream.stats()
    finally:
        stream.close()
    assert stats.frames_seen == 30 and stats.cameras == {"front": 20, "rear": 10}
    assert stats.tokens_seen >= 30 * per_frame and stats.evictions >= 20 * per_frame
    assert stats.tokens_held <= budget + max_chunk and stats.next_position <= budget + max_chunk
    assert stats.newest_stamp == STAMP + 29 and stats.oldest_stamp is not None
    if policy in ("window", "streamingllm"):  # recency-only: nothing but the last few frames is left
        assert stats.oldest_stamp >= STAMP + 25
    assert answer.generated_tokens >= 1 and answer.text  # decoded text, not a claim that it is right


def test_mrope_rerotated_keys_equal_rope_at_the_kept_3d_positions(tiny_qwen25vl):
    """Layer 0's key for a token depends on its embedding alone: recompute it at the position the cache records.

    Also checks what re-rotation must preserve: each kept visual token keeps its place in the frame's grid
    (height and width minus time), and the time component keeps the stream's order.
    """
    lm = tiny_qwen25vl
    thirty_chunks = _thirty_chunks(lm)
    stream = _raw_stream(lm, policy="infmllm", budget_tokens=100, max_chunk_tokens=40, recent=16, per_head=True)
    try:
        for chunk in thirty_chunks:
            stream.append_chunk(chunk)
        layer = stream.cache.layers[0]
        assert stream.cache.next_position <= 140
        embeds = torch.cat([c.inputs_embeds for c in thirty_chunks], dim=1)[0]
        rel = torch.cat([c.rope_positions[:, 0] for c in thirty_chunks], dim=1).T  # [tokens, 3]
        chunk_of = torch.cat([torch.full((len(c),), i) for i, c in enumerate(thirty_chunks)])
        text = lm.model.model.language_model
        attn = text.layers[0].self_attn
        heads = layer.keys.shape[1]
        with torch.no_grad():
            hidden = text.layers[0].input_layernorm(embeds.unsqueeze(0))
            k_all = attn.k_proj(hidden).view(1, -1, heads, attn.head_dim)[0]  # [tokens, heads, head_dim]
            for h in range(heads):
                seen = layer.seen[0, h]
                pos = layer.positions[0, h].long()  # [kept, 3]
                cos, sin = text.rotary_emb(hidden, pos.T.unsqueeze(1))
                k = k_all[seen, h].unsqueeze(0)
                half = k.shape[-1] // 2
                rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
                expected = k * cos + rotated * sin
                torch.testing.assert_close(layer.held("keys")[0, h], expected[0], rtol=1e-4, atol=1e-4)
                # The grid offsets (h - t, w - t) survive re-rotation.
                assert torch.equal(pos[:, 1:] - pos[:, :1], rel[seen, 1:] - rel[seen, :1])
                # Time keeps the stream's order: equal within a frame's grid, increasing otherwise.
                same = (chunk_of[seen][1:] == chunk_of[seen][:-1]) & (rel[seen, 0][1:] == rel[seen, 0][:-1])
                step = pos[1:, 0] - pos[:-1, 0]
                assert bool((step[same] == 0).all()) and bool((step[~same] > 0).all())
    finally:
        stream.close()


# -- (c) with room for everything, streaming equals the model's own forward pass ------------------------------

def _reference_logits(lm, encoder, frames, cameras, stamps):
    inputs = encoder.processor_inputs(frames, cameras, stamps)
    ids = torch.cat([item["input_ids"] for item in inputs], dim=1)
    if encoder.mrope:
        vision = {"pixel_values": torch.cat([item["pixel_values"] for item in inputs]),
                  "image_grid_thw": torch.cat([item["image_grid_thw"] for item in inputs]),
                  "mm_token_type_ids": (ids == encoder.image_token_id).int()}
    else:
        vision = {"pixel_values": torch.cat([item["pixel_values"] for item in inputs], dim=1),
                  "pixel_attention_mask": torch.cat([item["pixel_attention_mask"] for item in inputs], dim=1)}
    with torch.no_grad():
        logits = lm.model(input_ids=ids, **vision).logits[0].float()
        plain = lm.model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), **vision).logits[0]
    return logits, plain.float()


# Every policy on M-RoPE; 1-D RoPE is covered by the SmolLM2 engine tests, so three suffice for Idefics3.
EQUIVALENCE = [("qwen2_5_vl", p) for p in sorted(POLICIES)] + [("idefics3", p) for p in ("full", "infmllm", "h2o")]


@pytest.mark.parametrize("name, policy", EQUIVALENCE)
def test_streamed_frames_match_the_unstreamed_forward(request, name, policy):
    lm = request.getfixturevalue(FIXTURE[name])
    encoder = VlmEncoder.from_model(lm)
    frames, cameras, stamps = _frames(3, seed=3), ["front", "left", "front"], [STAMP, STAMP + 0.5, STAMP + 1]
    reference, plain = _reference_logits(lm, encoder, frames, cameras, stamps)
    if encoder.mrope:
        # The check has teeth: plain 1-D positions change the logits by far more than the tolerance.
        assert (plain - reference).abs().max() > 0.1
    stream = _raw_stream(lm, policy=policy, budget_tokens=1024, max_chunk_tokens=64, recent=16)
    try:
        chunks = encoder.encode_batch(frames, cameras, stamps)
        got = torch.cat([stream.append_chunk(c, return_logits=True).logits for c in chunks])
        assert stream.stats().evictions == 0
    finally:
        stream.close()
    assert got.shape == reference.shape
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


# -- (d) bad frames -------------------------------------------------------------------------------------------

def test_bad_frames_get_a_clear_error_or_are_converted(family):
    _, lm = family
    encoder = VlmEncoder.from_model(lm)
    expected = len(encoder.encode(_frames(1)[0], "front", STAMP))
    with pytest.raises(FrameError, match="empty"):
        encoder.encode(np.zeros((0, 0, 3), np.uint8), "front", STAMP)
    with pytest.raises(FrameError, match="channel"):
        encoder.encode(np.zeros((112, 112, 5), np.uint8), "front", STAMP)
    with pytest.raises(FrameError, match="NaN"):
        encoder.encode(np.full((112, 112, 3), np.nan, np.float32), "front", STAMP)
    with pytest.raises(FrameError, match="MP"):  # 110 MP, refused before any pixel is touched
        encoder.encode(np.broadcast_to(np.zeros(1, np.uint8), (11_000, 10_000, 3)), "front", STAMP)
    with pytest.raises(FrameError, match="batch"):
        encoder.encode(np.zeros((2, 112, 112, 3), np.uint8), "front", STAMP)
    # 16-bit mono (depth, thermal) and channel-first floats are converted; a 4K frame is downscaled first.
    mono16 = np.random.default_rng(0).integers(0, 4096, size=(112, 112), dtype=np.uint16)
    assert len(encoder.encode(mono16, "front", STAMP)) == expected
    chw = np.random.default_rng(1).random((3, 112, 112), dtype=np.float32)
    assert len(encoder.encode(chw, "front", STAMP)) == expected
    big = encoder.encode(np.broadcast_to(np.uint8(90), (3000, 5000, 3)), "front", STAMP)
    assert torch.isfinite(big.inputs_embeds).all()


def test_qwen_refuses_a_frame_too_elongated_for_its_processor(tiny_qwen25vl):
    encoder = VlmEncoder.from_model(tiny_qwen25vl)
    with pytest.raises(FrameError, match="elongated"):
        encoder.encode(np.zeros((2, 500, 3), np.uint8), "front", STAMP)
    assert len(encoder.encode(np.zeros((1, 1, 3), np.uint8), "front", STAMP)) > 0  # upscaled to min_pixels


def test_the_model_presets_use_the_option_names_from_model_takes():
    import inspect
    from pathlib import Path

    import yaml

    accepted = set(inspect.signature(VlmEncoder.from_model).parameters) - {"lm", "ignored"}
    presets = sorted((Path(__file__).resolve().parents[2] / "config" / "models").glob("*.yaml"))
    vlm_presets = 0
    for path in presets:
        params = yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
        encoder = params.get("encoder", {})
        if encoder.get("type") != "vlm":
            continue
        vlm_presets += 1
        assert set(encoder) - {"type"} <= accepted, path.name
    assert vlm_presets >= 3
