"""Speed: chunked-prefill and decode tokens/s and seconds per query, every policy side by side.

One stream per policy is first filled to ``budget + chunk`` tokens of novel
text (untimed; the capped caches are full from then on). Then ``repeats``
rounds run the policies interleaved (the order rotates each round, so load
from other processes on a shared machine hits all of them alike); each round
times, per policy: ``tokens`` of chunked prefill, ``decode_tokens`` greedy
decode steps (the cache in decoding mode: H2O evicts at every step, Inf-MLLM
lets the cache grow by at most one chunk), and one ``Stream.ask`` of
``query_tokens`` tokens at most. Reported: medians over the rounds, and the
ratios infmllm/h2o and infmllm/streamingllm (>1 = Inf-MLLM faster). ``full``
keeps growing across rounds (it has no budget); its cache size is reported.

``--peer llama.cpp`` adds two references to the same rounds (:mod:`.peers`):
llama.cpp (llama-cpp-python on the same GGUF, in its own venv) and plain
transformers (``DynamicCache``), each fed the same token ids in the same chunks
with the same threads, at the context of a capped cache (cut back to ``budget``
tokens before each chunk and before decoding). Every policy line then carries
``vs_llama.cpp`` and ``vs_transformers``: our/their tokens/s for prefill and
decode, the median of the per-round ratios. With ``quantize=int4`` plain
transformers runs twice, with the int4 weights and with the float weights
(``transformers_fp32``, ``vs_transformers_fp32``: what a user of the
dequantised GGUF gets).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Optional

import torch

from .common import (BenchConfig, append_in_chunks, emit, get_model, greedy_decode, progress, pyplot, raw_stream,
                     Variant, record, run_label, save_figure, text_token_ids, variants)


def _sync(lm) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def _prefill(stream, ids, chunk, lm) -> float:
    _sync(lm)
    start = time.perf_counter()
    append_in_chunks(stream, ids, chunk)
    _sync(lm)
    return time.perf_counter() - start


def _decode(stream, steps, lm) -> float:
    from infmllm_ros.engine import Chunk

    logits = stream.append_chunk(Chunk(input_ids=torch.tensor([[lm.tokenizer.encode(" The")[0]]])),
                                 return_logits=True).logits[-1]
    _sync(lm)
    start = time.perf_counter()
    greedy_decode(stream, logits, steps)
    _sync(lm)
    return time.perf_counter() - start


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    from .peers import make_references

    lm = get_model(cfg, lm)
    results = []
    start_token = lm.tokenizer.encode(" The")[0]
    for budget in cfg.budgets:
        vs = variants(cfg, int(budget))
        fill = int(budget) + cfg.chunk
        per_round = cfg.tokens + cfg.decode_tokens + 40
        ids = text_token_ids(lm, cfg.text, fill + cfg.repeats * cfg.tokens)
        refs = make_references(cfg, lm, int(budget))
        streams = {v.label: raw_stream(lm, v.stream_config(cfg)) for v in vs}
        timings = {v.label: {"prefill": [], "decode": [], "query": [], "query_tokens": []} for v in vs}
        ref_timings = {r.label: {"prefill": [], "decode": []} for r in refs}
        bar = progress((len(vs) + len(refs)) * (fill + cfg.repeats * per_round), f"speed b={budget}")
        compile_s = {}
        try:
            for v in vs:
                _prefill(streams[v.label], ids[:, :fill], cfg.chunk, lm)
                # Compiles the decode step when compile is on (untimed; reported as compile_s).
                compile_s[v.label] = streams[v.label].warmup()
                bar.update(fill)
            for r in refs:
                r.fill(ids[0, :int(budget)].tolist() if r.label == "llama.cpp" else ids[:, :int(budget)])
                bar.update(fill)
            for rnd in range(cfg.repeats):
                block = ids[:, fill + rnd * cfg.tokens: fill + (rnd + 1) * cfg.tokens]
                entries = vs + refs
                order = entries[rnd % len(entries):] + entries[:rnd % len(entries)]
                for v in order:
                    if v in refs:  # a reference engine: same tokens, chunks and context, no policy
                        t = ref_timings[v.label]
                        piece = block[0].tolist() if v.label == "llama.cpp" else block
                        t["prefill"].append(block.shape[1] / v.prefill(piece, cfg.chunk, int(budget)))
                        t["decode"].append(cfg.decode_tokens / v.decode(cfg.decode_tokens, int(budget),
                                                                        start_token))
                        bar.update(per_round)
                        continue
                    s, t = streams[v.label], timings[v.label]
                    if s.capacity and s.stats().tokens_held + block.shape[1] + per_round > s.capacity:
                        # `full` would pass the model's context: start it again from the fill (untimed).
                        s.reset()
                        s._started = s._in_user_turn = True
                        _prefill(s, ids[:, :fill], cfg.chunk, lm)
                    t["prefill"].append(block.shape[1] / _prefill(s, block, cfg.chunk, lm))
                    t["decode"].append(cfg.decode_tokens / _decode(s, cfg.decode_tokens, lm))
                    answer = s.ask("What happened in the last paragraph?", max_new_tokens=cfg.query_tokens)
                    t["query"].append(answer.latency_s)
                    t["query_tokens"].append(answer.generated_tokens)
                    bar.update(per_round)
            held = {label: s.stats().tokens_held for label, s in streams.items()}
            peer_info = {r.label: getattr(r, "info", {}) for r in refs}
        finally:
            bar.close()
            for s in streams.values():
                s.close()
            for r in refs:
                r.close()
        med = {label: {k: statistics.median(x) for k, x in t.items()} for label, t in timings.items()}
        lines = []
        for v in vs:
            m = med[v.label]
            lines.append(record(cfg, lm, v, tokens=cfg.tokens, fill=fill, repeats=cfg.repeats,
                                prefill_tok_s=m["prefill"], decode_tok_s=m["decode"], query_s=m["query"],
                                query_generated=m["query_tokens"], decode_tokens=cfg.decode_tokens,
                                tokens_held_end=held[v.label], compile_s=compile_s.get(v.label),
                                prefill_runs=timings[v.label]["prefill"],
                                decode_runs=timings[v.label]["decode"], query_runs=timings[v.label]["query"]))
        for r in refs:
            t = ref_timings[r.label]
            lines.append(_reference_line(cfg, lm, r.label, int(budget), t, peer_info.get(r.label)))
        _ratios(lines)
        for line in lines:
            emit(cfg, line)
        for line in lines:  # the side-by-side ratios, readable
            for key in [f"vs_{ref}" for ref in REFERENCES] + ["vs_h2o", "vs_streamingllm"]:
                if key in line:
                    r = line[key]
                    print(f"  {line['policy']} / {key[3:]}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()),
                          file=sys.stderr)
        results.extend(lines)
    return results


#: The reference engines' labels (bench/peers.py), each read as ``vs_<label>``.
REFERENCES = ("llama.cpp", "transformers", "transformers_fp32")


def _ratios(lines: list[dict]) -> None:
    """Add infmllm/h2o and infmllm/streamingllm speed ratios (>1: Inf-MLLM faster) to the infmllm lines.

    Each ratio is the median over rounds of the ratio within a round (the two
    policies ran back to back), which cancels slow drifts in machine load.
    """
    by = {x["policy"]: x for x in lines}
    for line in lines:
        for ref in REFERENCES:
            if ref in by and line["base_policy"] not in REFERENCES:
                o = by[ref]
                line[f"vs_{ref}"] = {
                    "prefill": statistics.median(a / b for a, b in zip(line["prefill_runs"], o["prefill_runs"])),
                    "decode": statistics.median(a / b for a, b in zip(line["decode_runs"], o["decode_runs"])),
                }
        if line["base_policy"] != "infmllm":
            continue
        for other in ("h2o", "streamingllm"):
            if other in by:
                o = by[other]
                line[f"vs_{other}"] = {
                    "prefill": statistics.median(a / b for a, b in zip(line["prefill_runs"], o["prefill_runs"])),
                    "decode": statistics.median(a / b for a, b in zip(line["decode_runs"], o["decode_runs"])),
                    "query": statistics.median(b / a for a, b in zip(line["query_runs"], o["query_runs"])),
                }


def _reference_line(cfg: BenchConfig, lm, label: str, budget: int, t: dict,
                    info: Optional[dict]) -> dict:
    """A result line for a reference engine, shaped like a policy's (no query: it has no chat stream)."""
    line = record(cfg, lm, Variant(label, label, budget, 0.0, False), tokens=cfg.tokens, fill=budget,
                  repeats=cfg.repeats, prefill_tok_s=statistics.median(t["prefill"]),
                  decode_tok_s=statistics.median(t["decode"]), query_s=None, decode_tokens=cfg.decode_tokens,
                  context=f"cut to {budget} tokens before each {cfg.chunk}-token chunk and before decoding",
                  prefill_runs=t["prefill"], decode_runs=t["decode"], query_runs=[])
    if label == "llama.cpp":
        line.update(model=f"{lm.name} (GGUF Q4_1)", dtype="q4_1", device="cpu", peer=info or {})
    if label == "transformers_fp32":  # the int4 model's float weights throughout
        line.update(quantize="none")
    return line


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    plt = pyplot()
    paths = []
    for budget in sorted({r["budget"] for r in results}):
        rows = [r for r in results if r["budget"] == budget]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        for ax, key, label in zip(axes, ("prefill_tok_s", "decode_tok_s", "query_s"),
                                  ("chunked prefill (tokens/s)", "decode (tokens/s)", "seconds per query")):
            ax.bar(range(len(rows)), [r[key] or 0.0 for r in rows])  # references have no query
            ax.set_xticks(range(len(rows)), [r["policy"] for r in rows], rotation=20, fontsize=8)
            ax.set_title(label, fontsize=9)
        r0 = rows[0]
        fig.suptitle(f"Speed at budget {budget}, chunk {r0['chunk']} (medians of {r0['repeats']} interleaved rounds); " +
                     run_label(r0), fontsize=8)
        path = save_figure(fig, cfg, f"speed_b{budget}")
        paths.append(path)
    return paths
