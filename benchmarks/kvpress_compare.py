#!/usr/bin/env python3
"""Side by side with NVIDIA kvpress on the same model, text, budget and process.

kvpress 0.5.5 (the current release) pins ``transformers<5.3``, so this runs in
its own virtualenv: ``bash benchmarks/kvpress.sh`` builds ``.venv-kvpress``
(torch 2.13.0 CPU, kvpress 0.5.5, transformers 5.2) and runs this script with
the repository on ``PYTHONPATH``; our engine runs in the same process on the
same transformers, so every number in one output is measured side by side.

Two protocols, each as the methods' own code uses them:

1. **ppl of a chunked stream** (as ``infmllm-bench ppl``): the text in
   ``--chunk``-token pieces, each chunk's logits scoring its tokens. Ours:
   StreamingLLM, H2O and Inf-MLLM streams (keys re-rotated), and
   ``streamingllm-grow`` (the same kept tokens at their original positions,
   as kvpress keeps them). kvpress: its
   decoding-time press, ``DecodingPress(base_press, compression_interval=1,
   target_size=budget)``, which after every forward past the first prunes
   the cache back to the budget by the base press's scores; base presses
   ``StreamingLLMPress(n_sink=4)`` and ``SnapKVPress(window_size=64)``, as
   released and with the kept tokens left in stream order (``in_order``:
   0.5.5 reorders them by score, which breaks repeated StreamingLLM pruning).
   kvpress keeps every key at its original position (no re-rotation), so
   positions grow with the stream and the run stops at the model's context
   (8192 tokens for SmolLM2); ours are measured on the same tokens. The
   same loop without a press (``kvpress-loop:full``) must match our ``full``.
2. **recall of one early fact** (the ``single`` scenario of ``infmllm-bench
   recall``, the same seeded trials): kvpress the way its pipeline uses a
   press, the whole context (filler, fact, filler) prefilled in one forward
   under the press with ``compression_ratio = 1 - budget / context``, then
   the question; the question is not seen by the press. ``snapkv+question``
   prefills context + question under SnapKV and asks the question again
   after it: SnapKV's paper setting (its observation window is the end of the
   prompt), which a stream cannot have, because the question arrives after
   the frames. Ours stream the same tokens in ``--recall-chunk`` pieces.

Every kvpress result is prefixed ``kvpress:``. Prints one JSON line per
variant (``--json``) and saves them under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infmllm_ros.bench import ppl as ppl_bench  # noqa: E402
from infmllm_ros.bench import recall as recall_bench  # noqa: E402
from infmllm_ros.bench.common import (BenchConfig, data_file, machine_info, pyplot, raw_stream,  # noqa: E402
                                      run_label, save_figure, text_token_ids, variants)


def _positions(start: int, count: int, held: int) -> dict:
    """RoPE positions keep the stream's absolute index (kvpress does not re-rotate); the causal
    mask needs the index inside the pruned cache."""
    return {"position_ids": torch.arange(start, start + count)[None],
            "cache_position": torch.arange(held, held + count)}


def in_order(press_cls):
    """``press_cls`` whose pruning keeps the surviving tokens in stream order.

    kvpress 0.5.5's ``ScorerPress.compress`` gathers the kept tokens in
    ``torch.topk`` order, i.e. by score, ties in no particular order. Pruned
    once (its pipeline) that is harmless: attention does not care about the
    order of keys. Pruned again and again (``DecodingPress``), it is not:
    ``StreamingLLMPress`` drops the cache slots right after the first
    ``n_sink`` slots, assuming slot order is stream order, so once the order is
    shuffled the sinks themselves get dropped (measured: perplexity as without
    sinks), and SnapKV's pooling smooths across unrelated neighbours. Sorting
    the kept indices, as kvpress's own ``KeyRerotationPress`` does, restores
    what the methods assume; the scores are untouched.
    """
    from kvpress.utils import compute_n_kept

    class InOrder(press_cls):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            kept = scores.topk(compute_n_kept(keys.shape[2], self.compression_ratio), dim=-1).indices
            kept = kept.sort(dim=-1).values.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
            return keys.gather(2, kept).contiguous(), values.gather(2, kept).contiguous()

    InOrder.__name__ = InOrder.__qualname__ = f"InOrder{press_cls.__name__}"
    return InOrder


def kvpress_nll(model, press, ids: torch.Tensor, chunk: int) -> tuple[list[float], int]:
    """NLL of every token after the first, streamed in chunks through ``press`` (None: full cache)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    nll, previous, held_max = [], None, 0
    with torch.inference_mode(), (press(model) if press is not None else nullcontext()):
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start:start + chunk]
            held = cache.get_seq_length()
            logits = model(input_ids=piece, past_key_values=cache, use_cache=True,
                           **_positions(start, piece.shape[1], held)).logits[0].float()
            held_max = max(held_max, cache.get_seq_length())
            piece_nll, previous = ppl_bench.chunk_nll(logits, piece, previous)
            nll.extend(piece_nll)
    return nll, held_max


def kvpress_recall_rank(model, press, context: torch.Tensor, question: torch.Tensor, budget: int,
                        word: str, candidates: dict) -> tuple[int, int]:
    """Prefill ``context`` under the press (compressed to ``budget``), then the question: (rank, kept)."""
    from transformers import DynamicCache

    n = context.shape[1]
    press.compression_ratio = max(0.0, 1.0 - budget / n)
    cache = DynamicCache()
    with torch.inference_mode():
        with press(model):
            model(input_ids=context, past_key_values=cache, use_cache=True, **_positions(0, n, 0))
        held = cache.get_seq_length()
        logits = model(input_ids=question, past_key_values=cache, use_cache=True,
                       **_positions(n, question.shape[1], held)).logits[0, -1]
    return recall_bench.candidate_rank(logits, word, candidates), held


def _line(args, policy: str, model_name: str, **figures) -> dict:
    import transformers

    return {"bench": figures.pop("bench"), "policy": policy, "budget": args.budget, "model": model_name,
            "device": "cpu", "dtype": "float32", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": machine_info(), "transformers": transformers.__version__,
            "kvpress": _kvpress_version(), "python": platform.python_version(), **figures}


def _kvpress_version() -> str:
    from importlib.metadata import version

    return version("kvpress")


def run_ppl(args, lm, emit) -> None:
    from kvpress import DecodingPress, SnapKVPress, StreamingLLMPress

    context = int(lm.text_config.max_position_embeddings)
    tokens = min(args.tokens, context) // args.chunk * args.chunk
    ids = text_token_ids(lm, args.text, tokens)
    cfg = BenchConfig(command="ppl", policies=["full", "streamingllm", "streamingllm-grow", "h2o", "infmllm"],
                      budgets=[args.budget],
                      biases=[0.0, 1.0], chunk=args.chunk, tokens=tokens, threads=1)
    def decoding(base):
        return DecodingPress(base_press=base, compression_interval=1, target_size=args.budget,
                             hidden_states_buffer_size=args.chunk)

    presses = {  # None: the same loop with no press, a control that must match our `full`
        "kvpress-loop:full (no press)": None,
        "kvpress:streamingllm (DecodingPress)": decoding(StreamingLLMPress(n_sink=4)),
        "kvpress:snapkv (DecodingPress)": decoding(SnapKVPress(window_size=64)),
        "kvpress:streamingllm (DecodingPress, in order)": decoding(in_order(StreamingLLMPress)(n_sink=4)),
        "kvpress:snapkv (DecodingPress, in order)": decoding(in_order(SnapKVPress)(window_size=64)),
    }
    for variant in variants(cfg, args.budget):
        started = time.perf_counter()
        stream = raw_stream(lm, variant.stream_config(cfg))
        try:
            nll = ppl_bench.stream_nll(stream, ids, args.chunk)
            held = stream.stats().tokens_held
        finally:
            stream.close()
        emit(_line(args, variant.label, lm.name, bench="ppl", tokens=tokens, chunk=args.chunk,
                   ppl=math.exp(sum(nll) / len(nll)), segments=ppl_bench.segments(nll, args.segment),
                   segment=args.segment, tokens_held_end=held, seconds=round(time.perf_counter() - started, 1)))
    for name, press in presses.items():
        started = time.perf_counter()
        nll, held = kvpress_nll(lm.model, press, ids, args.chunk)
        emit(_line(args, name, lm.name, bench="ppl", tokens=tokens, chunk=args.chunk,
                   ppl=math.exp(sum(nll) / len(nll)), segments=ppl_bench.segments(nll, args.segment),
                   segment=args.segment, tokens_held_max=held, seconds=round(time.perf_counter() - started, 1)))


def run_recall(args, lm, emit) -> None:
    from kvpress import SnapKVPress, StreamingLLMPress

    text = data_file(args.text).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    pool = recall_bench.single_token_words(lm.tokenizer)
    cfg = BenchConfig(command="recall", policies=["streamingllm", "h2o", "infmllm"], budgets=[args.budget],
                      biases=[0.0], chunk=args.recall_chunk, trials=args.trials, distances=args.distances,
                      scenarios=["single"], free_form_tokens=1, threads=1)
    for variant in variants(cfg, args.budget):
        started = time.perf_counter()
        result = recall_bench.single_fact(cfg, lm, variant, text, pool, None)
        emit(_line(args, variant.label, lm.name, bench="recall", chunk=args.recall_chunk,
                   single_by_distance={d: {k: v[k] for k in ("correct", "trials", "ranks")}
                                       for d, v in result["single_by_distance"].items()},
                   accuracy=result["single_accuracy"], seconds=round(time.perf_counter() - started, 1)))
    question = lm.tokenizer(recall_bench.SINGLE_QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"]
    presses = {"kvpress:streamingllm": (StreamingLLMPress(n_sink=4), False),
               "kvpress:snapkv": (SnapKVPress(window_size=64), False),
               "kvpress:snapkv+question": (SnapKVPress(window_size=64), True)}
    for name, (press, with_question) in presses.items():
        started = time.perf_counter()
        by_distance = {}
        for distance in cfg.distances:
            ranks, kept = [], 0
            for word, pieces, cands in recall_bench.single_fact_trials(cfg, lm.tokenizer, text, pool, distance):
                context = torch.cat(pieces + ([question] if with_question else []), dim=1)
                rank, kept = kvpress_recall_rank(lm.model, press, context, question, args.budget, word, cands)
                ranks.append(rank)
            by_distance[str(distance)] = {"correct": sum(r == 1 for r in ranks), "trials": len(ranks),
                                          "ranks": ranks, "kept": kept}
        correct = sum(v["correct"] for v in by_distance.values())
        emit(_line(args, name, lm.name, bench="recall", single_by_distance=by_distance,
                   accuracy=correct / sum(v["trials"] for v in by_distance.values()),
                   seconds=round(time.perf_counter() - started, 1)))


def plot(results: list[dict], out: Path) -> list[Path]:
    """ppl per segment (ours vs kvpress) and recall accuracy by distance, one PNG each."""
    plt = pyplot()
    where = BenchConfig(out=str(out))  # save_figure writes <out>/<name>.png
    paths = []
    ppl = [x for x in results if x["bench"] == "ppl"]
    recall = [x for x in results if x["bench"] == "recall"]
    if ppl:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for x in ppl:
            xs = [(i + 1) * x["segment"] / 1000 for i in range(len(x["segments"]))]
            ax.plot(xs, x["segments"], marker="o", ms=3, ls="--" if x["policy"].startswith("kvpress") else "-",
                    label=f"{x['policy']} (mean {x['ppl']:.2f})")
        ax.set_xlabel(f"stream position (K tokens; ppl per {ppl[0]['segment']}-token segment)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"Streamed novel, budget {ppl[0]['budget']}, chunk {ppl[0]['chunk']}: ours vs kvpress "
                     f"{ppl[0]['kvpress']}\n{run_label(ppl[0])}", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, where, "kvpress_ppl"))
    if recall:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        distances = list(recall[0]["single_by_distance"])
        width = 0.8 / len(recall)
        for i, x in enumerate(recall):
            acc = [x["single_by_distance"][d]["correct"] / x["single_by_distance"][d]["trials"] for d in distances]
            ax.bar([j + i * width for j in range(len(distances))], acc, width, label=x["policy"],
                   hatch="//" if x["policy"].startswith("kvpress") else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(distances))], [f"{d} tokens back" for d in distances])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fact ranked first of 10 candidates")
        ax.set_title(f"One early fact, budget {recall[0]['budget']}: ours (streamed) vs kvpress (one-shot prefill)"
                     f"\n{run_label(recall[0])}", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, where, "kvpress_recall"))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("ppl", "recall", "all"), default="all")
    parser.add_argument("--text", default="text/pg158-emma.txt")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192, help="ppl: capped at the model's context")
    parser.add_argument("--segment", type=int, default=2048)
    parser.add_argument("--recall-budget", type=int, default=512)
    parser.add_argument("--recall-chunk", type=int, default=64)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--distance", dest="distances", type=int, action="append")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", action="store_true", help="PNG plots under --out")
    parser.add_argument("--out", default="bench_results/kvpress")
    args = parser.parse_args(argv)
    args.distances = args.distances or [500, 1500]
    if args.quick:
        args.budget, args.chunk, args.tokens, args.segment = 384, 128, 768, 256
        args.recall_budget, args.recall_chunk, args.trials, args.distances = 256, 64, 1, [300]
    torch.set_num_threads(1)

    from infmllm_ros.engine.models import load_model

    lm = load_model("smollm2", device="cpu", dtype="float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []

    def emit(line: dict) -> None:
        results.append(line)
        if args.json:
            print(json.dumps(line), flush=True)

    if args.part in ("ppl", "all"):
        run_ppl(args, lm, emit)
    if args.part in ("recall", "all"):
        budget = args.budget
        args.budget = args.recall_budget
        run_recall(args, lm, emit)
        args.budget = budget
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"kvpress_{'quick_' if args.quick else ''}{stamp}.json"
    plots = [str(p) for p in plot(results, out)] if args.plot else []
    path.write_text(json.dumps({"args": vars(args), "results": results, "plots": plots}, indent=1))
    print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
