"""The compiled, static-shape decode step (``compile="on"``) against the eager one.

A tiny random-weight Llama of the real transformers class keeps the compile
short on a CPU (inductor); the same code runs with CUDA graphs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from infmllm_ros.bench.common import raw_stream
from infmllm_ros.engine import Chunk, StreamConfig

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_llama(make_random_lm):
    return make_random_lm("llama", "sdpa")


def _stream(lm, compile_mode, **extra):
    return raw_stream(lm, StreamConfig(policy="infmllm", budget_tokens=64, max_chunk_tokens=16, recent=8,
                                       retrieval_window=8, compile=compile_mode, **extra))


def _piece(ids, number, extra):
    """Text, or with ``keep_latest_per_camera`` a frame of camera ``a`` (pieces 0 and 3) or ``b``."""
    if not extra.get("keep_latest_per_camera"):
        return Chunk(input_ids=ids)
    return Chunk(input_ids=ids, kind="frame", camera="a" if number in (0, 3) else "b")


# The other cases keep per-token state beside the keys (carried scores, chunk numbers, camera ids),
# which the compiled step writes through its persistent inputs: it must hold what the eager step holds.
@pytest.mark.parametrize("extra", [{}, {"decay": 0.5, "granularity": "chunk"}, {"keep_latest_per_camera": True}],
                         ids=["plain", "decay-chunk", "latest-per-camera"])
def test_compiled_decode_steps_match_eager_ones_and_compile_once(tiny_llama, extra):
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    ids = torch.randint(100, 40000, (1, 200))
    eager, compiled = _stream(tiny_llama, "off", **extra), _stream(tiny_llama, "on", **extra)
    try:
        assert compiled.compiled and not eager.compiled
        for s in (eager, compiled):
            for start in range(0, 96, 16):
                s.append_chunk(_piece(ids[:, start:start + 16], start // 16, extra))
        seconds = compiled.warmup()
        assert seconds is not None and seconds > 0
        graphs = counters["stats"]["unique_graphs"]
        step = compiled._decode_step
        for round_ in range(2):
            for s in (eager, compiled):
                s.cache.decoding = True
            # Forced tokens (not argmax) so both streams see the same inputs; the cache grows into
            # its answer room (16) and then evicts (an eager step), then decodes compiled again.
            for i in range(20):
                token = int(ids[0, 100 + i])
                expected = eager._decode_one(token)
                got = compiled._decode_one(token)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            for s in (eager, compiled):
                s.cache.decoding = False
                s.append_chunk(_piece(ids[:, 120 + 16 * round_:136 + 16 * round_], round_, extra))
            assert compiled.stats().tokens_held == eager.stats().tokens_held
            for a, b in zip(compiled.cache.layers, eager.cache.layers):
                assert torch.equal(a.seen, b.seen)
                torch.testing.assert_close(a.held("keys"), b.held("keys"), rtol=1e-4, atol=1e-4)
                assert set(a.buffers) == set(b.buffers)
                for name in a.buffers:
                    torch.testing.assert_close(a.held(name), b.held(name), rtol=1e-4, atol=1e-4)
        assert step.calls >= 30  # most steps ran compiled
        assert counters["stats"]["unique_graphs"] == graphs  # and nothing was compiled again
        answer = compiled.ask("What was seen?", max_new_tokens=8)
        assert answer.generated_tokens >= 1
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        eager.close()
        compiled.close()
