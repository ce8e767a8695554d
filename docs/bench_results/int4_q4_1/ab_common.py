"""What the A/B scripts beside this file share: a stream over a novel, and greedy decoding rounds that
alternate between two arms from one snapshot (docs/benchmarks.md section 12e)."""
import glob
import os
import statistics
import time

import torch

from infmllm_ros.engine import Chunk, Stream, StreamConfig


def novel_ids(tokenizer, tokens: int = 1100) -> torch.Tensor:
    """The first ``tokens`` tokens of the first novel in the shared data: ``[1, tokens]``."""
    data = os.environ.get("INFMLLM_SHARED_DATA", "/work/shared/data")
    text = open(sorted(glob.glob(f"{data}/**/*.txt", recursive=True))[0]).read()[:30000]
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]


def filled_stream(lm, ids: torch.Tensor) -> Stream:
    """Inf-MLLM at budget 1024, fed ``ids`` in 256-token chunks; its decode must walk the layers directly."""
    stream = Stream(lm, StreamConfig(policy="infmllm", budget_tokens=1024))
    for i in range(0, ids.shape[1], 256):
        stream.append_chunk(Chunk(input_ids=ids[:, i:i + 256], kind="text"))
    assert stream.decode_path == "direct", stream.decode_path
    return stream


def alternate(arms: dict, rounds: int = 12, tokens: int = 24) -> dict:
    """``arms``: name -> ``(stream, snapshot, before)``, ``before()`` called ahead of each of its rounds.

    Each round restores the arm's snapshot and decodes ``tokens`` greedy tokens, the arms' order swapped
    every round. Returns per-step time percentiles, per-round tok/s, the median per-round ratio of the
    second arm over the first, and whether both chose the same tokens."""
    names = list(arms)
    rates = {n: [] for n in names}
    steps = {n: [] for n in names}
    chosen = {}
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            stream, snapshot, before = arms[name]
            before()
            stream.restore(snapshot)
            stream.cache.decoding = True
            token, out = 100, []
            start = time.perf_counter()
            for _ in range(tokens):
                t0 = time.perf_counter()
                logits = stream._decode_one(token)
                steps[name].append(time.perf_counter() - t0)
                token = int(logits.argmax())
                out.append(token)
            rates[name].append(tokens / (time.perf_counter() - start))
            chosen.setdefault(name, out)
            stream.cache.decoding = False
    first, second = names
    summary = {n: {"min_ms": round(sorted(v)[0] * 1e3, 2), "p25_ms": round(sorted(v)[len(v) // 4] * 1e3, 2),
                   "median_ms": round(sorted(v)[len(v) // 2] * 1e3, 2)} for n, v in steps.items()}
    return {"threads": torch.get_num_threads(), "per_step": summary,
            "tok_s": {n: [round(x, 2) for x in v] for n, v in rates.items()},
            f"{second}/{first} per-round median": round(statistics.median(
                [b / a for a, b in zip(rates[first], rates[second])]), 3),
            "same tokens": chosen[first] == chosen[second], "tokens": chosen}
