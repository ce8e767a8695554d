"""The same cache under eager and sdpa attention, and in half precision."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from infmllm_ros.engine import Chunk, LoadedModel, Stream, StreamConfig

pytestmark = pytest.mark.model
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def ids(smollm2, emma_text):
    return smollm2.tokenizer(emma_text[:20_000], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :480]


def _variant(lm: LoadedModel, *, dtype=None, attn=None) -> LoadedModel:
    model = copy.deepcopy(lm.model)
    if dtype is not None:
        model = model.to(dtype)
    if attn is not None:
        model.config._attn_implementation_internal = attn
    return LoadedModel(model=model, tokenizer=lm.tokenizer, name=lm.name)


def _stream_logits(lm, ids, **settings):
    stream = Stream(lm, StreamConfig(**settings))
    stream._started = stream._in_user_turn = True
    try:
        logits = [stream.append_chunk(Chunk(input_ids=ids[:, i : i + 32]), return_logits=True).logits
                  for i in range(0, ids.shape[1], 32)]
        kept = [layer.seen.clone() for layer in stream.cache.layers]
        held = stream.stats().tokens_held
    finally:
        stream.close()
    return torch.cat(logits), kept, held


@pytest.mark.parametrize("policy", ["infmllm", "h2o"])
def test_eager_and_sdpa_evict_the_same_tokens(smollm2, ids, policy):
    eager = _variant(smollm2, attn="eager")
    settings = dict(policy=policy, budget_tokens=96, max_chunk_tokens=32, recent=16, retrieval_window=16)
    sdpa_logits, sdpa_kept, _ = _stream_logits(smollm2, ids, **settings)
    eager_logits, eager_kept, _ = _stream_logits(eager, ids, **settings)
    assert eager.model.config._attn_implementation == "eager"  # the hook put the model back
    agreement = sum(bool((a == b).all()) for a, b in zip(sdpa_kept, eager_kept)) / len(sdpa_kept)
    assert agreement >= 0.9, agreement  # float ties may flip a token in a layer or two, no more
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_streams_within_budget(smollm2, ids, dtype):
    half = _variant(smollm2, dtype=dtype)
    # Reference: transformers' own DynamicCache fed the same 32-token chunks (in half
    # precision, chunking alone changes the rounding, so it must be the same chunks).
    cache, reference = DynamicCache(), []
    with torch.inference_mode():
        for i in range(0, 128, 32):
            out = half.model(input_ids=ids[:, i : i + 32], **{CACHE_KWARG: cache}, use_cache=True,
                             position_ids=torch.arange(i, i + 32).unsqueeze(0))
            reference.append(out.logits[0].float())
    reference = torch.cat(reference)
    full_logits, _, _ = _stream_logits(half, ids[:, :128], policy="full", budget_tokens=0)
    torch.testing.assert_close(full_logits, reference, rtol=0, atol=1e-2)
    logits, kept, held = _stream_logits(half, ids[:, :256], policy="infmllm", budget_tokens=96, max_chunk_tokens=32, recent=16)
    assert held <= 96 and torch.isfinite(logits).all()
    stream = Stream(half, StreamConfig(policy="infmllm", budget_tokens=96, max_chunk_tokens=32, recent=16))
    try:
        assert stream.bytes_per_token == 2 * 3 * 64 * 2 * 30  # 2-byte elements
        assert stream.cache.layers[0].keys is None or stream.cache.layers[0].keys.dtype == dtype
    finally:
        stream.close()
