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

``reference`` (default on) adds plain transformers as the yardstick, in the
same rounds: the model's own ``DynamicCache`` filled with the same
``budget + chunk`` tokens, the same chunked prefill and greedy decode (its
cache cut back to the fill after each timing, so its context stays that of
the capped caches), and a question of the same length. Every policy line then
carries ``vs_transformers`` (>1 = faster than plain transformers).
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch

from .common import (BenchConfig, Variant, append_in_chunks, emit, get_model, greedy_decode, progress, pyplot,
                     raw_stream, record, run_label, save_figure, text_token_ids, variants)

REFERENCE = "transformers"
QUESTION = "What happened in the last paragraph?"


class PlainTransformers:
    """Plain transformers with its ``DynamicCache``: the yardstick, driven like the streams.

    After each timed part the cache is cut back to the ``fill`` tokens, so every
    round starts from the same context as the capped caches (``budget + chunk``).
    """

    def __init__(self, lm, fill_ids: torch.Tensor, chunk: int):
        from transformers import DynamicCache

        self.lm = lm
        params = inspect.signature(lm.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.cache = DynamicCache()
        self.chunk = chunk
        self.length = 0
        self._prefill(fill_ids)
        self.fill = self.length

    @torch.inference_mode()
    def _step(self, ids: torch.Tensor, logits: bool) -> torch.Tensor:
        n = ids.shape[1]
        out = self.lm.model(input_ids=ids.to(self.lm.device), use_cache=True, logits_to_keep=1,
                            position_ids=torch.arange(self.length, self.length + n, device=self.lm.device)[None],
                            **{self.cache_kwarg: self.cache})
        self.length += n
        return out.logits[0, -1] if logits else None

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = None
        for start in range(0, ids.shape[1], self.chunk):
            logits = self._step(ids[:, start:start + self.chunk], True)
        return logits

    def _cut_back(self) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[..., :self.fill, :]
            layer.values = layer.values[..., :self.fill, :]
        self.length = self.fill

    def _greedy(self, logits: torch.Tensor, steps: int) -> int:
        for _ in range(steps):
            logits = self._step(torch.tensor([[int(logits.argmax())]]), True)
        return steps

    def prefill(self, ids: torch.Tensor) -> float:
        _sync(self.lm)
        start = time.perf_counter()
        self._prefill(ids)
        _sync(self.lm)
        took = time.perf_counter() - start
        self._cut_back()
        return took

    def decode(self, first_token: int, steps: int) -> float:
        logits = self._step(torch.tensor([[first_token]]), True)
        _sync(self.lm)
        start = time.perf_counter()
        self._greedy(logits, steps)
        _sync(self.lm)
        took = time.perf_counter() - start
        self._cut_back()
        return took

    def query(self, question: str, steps: int) -> float:
        ids = self.lm.tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False,
                                return_tensors="pt")["input_ids"]
        start = time.perf_counter()
        self._greedy(self._prefill(ids), steps)
        _sync(self.lm)
        took = time.perf_counter() - start
        self._cut_back()
        return took


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
                                 return_logits="last").logits[-1]
    _sync(lm)
    start = time.perf_counter()
    greedy_decode(stream, logits, steps)
    _sync(lm)
    return time.perf_counter() - start


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    lm = get_model(cfg, lm)
    results = []
    first_token = lm.tokenizer.encode(" The")[0]
    for budget in cfg.budgets:
        vs = variants(cfg, int(budget))
        fill = int(budget) + cfg.chunk
        per_round = cfg.tokens + cfg.decode_tokens + 40
        ids = text_token_ids(lm, cfg.text, fill + cfg.repeats * cfg.tokens)
        streams = {v.label: raw_stream(lm, v.stream_config(cfg)) for v in vs}
        if cfg.reference:
            vs = vs + [Variant(REFERENCE, REFERENCE, int(budget))]
        timings = {v.label: {"prefill": [], "decode": [], "query": [], "query_tokens": []} for v in vs}
        bar = progress(len(vs) * (fill + cfg.repeats * per_round), f"speed b={budget}")
        plain = None
        compile_s = {}
        try:
            for v in vs:
                if v.policy == REFERENCE:
                    plain = PlainTransformers(lm, ids[:, :fill], cfg.chunk)
                else:
                    _prefill(streams[v.label], ids[:, :fill], cfg.chunk, lm)
                    # Compiles the decode step when compile is on (untimed; reported).
                    compile_s[v.label] = streams[v.label].warmup()
                bar.update(fill)
            for rnd in range(cfg.repeats):
                block = ids[:, fill + rnd * cfg.tokens: fill + (rnd + 1) * cfg.tokens]
                order = vs[rnd % len(vs):] + vs[:rnd % len(vs)]
                for v in order:
                    t = timings[v.label]
                    if v.policy == REFERENCE:
                        t["prefill"].append(block.shape[1] / plain.prefill(block))
                        t["decode"].append(cfg.decode_tokens / plain.decode(first_token, cfg.decode_tokens))
                        t["query"].append(plain.query(QUESTION, cfg.query_tokens))
                        t["query_tokens"].append(cfg.query_tokens)
                        bar.update(per_round)
                        continue
                    s = streams[v.label]
                    if s.capacity and s.stats().tokens_held + block.shape[1] + per_round > s.capacity:
                        # `full` would pass the model's context: start it again from the fill (untimed).
                        s.reset()
                        s._started = s._in_user_turn = True
                        _prefill(s, ids[:, :fill], cfg.chunk, lm)
                    t["prefill"].append(block.shape[1] / _prefill(s, block, cfg.chunk, lm))
                    t["decode"].append(cfg.decode_tokens / _decode(s, cfg.decode_tokens, lm))
                    answer = s.ask(QUESTION, max_new_tokens=cfg.query_tokens)
                    t["query"].append(answer.latency_s)
                    t["query_tokens"].append(answer.generated_tokens)
                    bar.update(per_round)
            held = {label: s.stats().tokens_held for label, s in streams.items()}
            if plain is not None:
                held[REFERENCE] = plain.fill
        finally:
            bar.close()
            for s in streams.values():
                s.close()
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
        _ratios(lines)
        for line in lines:
            emit(cfg, line)
        results.extend(lines)
    return results


def _ratios(lines: list[dict]) -> None:
    """Add infmllm/h2o and infmllm/streamingllm speed ratios (>1: Inf-MLLM faster) to the infmllm lines.

    Each ratio is the median over rounds of the ratio within a round (the two
    policies ran back to back), which cancels slow drifts in machine load.
    """
    by = {x["policy"]: x for x in lines}
    for line in lines:
        if REFERENCE in by and line["policy"] != REFERENCE:
            o = by[REFERENCE]
            line[f"vs_{REFERENCE}"] = {
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


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    plt = pyplot()
    paths = []
    for budget in sorted({r["budget"] for r in results}):
        rows = [r for r in results if r["budget"] == budget]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        for ax, key, label in zip(axes, ("prefill_tok_s", "decode_tok_s", "query_s"),
                                  ("chunked prefill (tokens/s)", "decode (tokens/s)", "seconds per query")):
            ax.bar(range(len(rows)), [r[key] for r in rows])
            ax.set_xticks(range(len(rows)), [r["policy"] for r in rows], rotation=20, fontsize=8)
            ax.set_title(label, fontsize=9)
        r0 = rows[0]
        fig.suptitle(f"Speed at budget {budget}, chunk {r0['chunk']} (medians of {r0['repeats']} interleaved rounds); " +
                     run_label(r0), fontsize=8)
        path = save_figure(fig, cfg, f"speed_b{budget}")
        paths.append(path)
    return paths
