"""Merge saved results (several runs of one benchmark, e.g. policies run in parallel) into tables and plots.

    python -m infmllm_ros.bench.report --out docs bench_results/ppl/*.json bench_results/recall/*.json ...

Prints Markdown tables (one per benchmark) and writes the merged plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .common import BenchConfig

ORDER = ["full", "window", "streamingllm", "streamingllm-grow", "h2o"]


def _key(line):
    p = line["policy"]
    return (line.get("budget", 0), ORDER.index(p) if p in ORDER else len(ORDER), line.get("bias", 0), p)


def load(paths) -> dict[str, tuple[BenchConfig, list[dict]]]:
    merged: dict[str, tuple[BenchConfig, list[dict]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(BenchConfig)}
        cfg = BenchConfig(**{k: v for k, v in data["config"].items() if k in known})
        for line in data["results"]:
            bench = line.get("bench", cfg.command)
            merged.setdefault(bench, (cfg, []))[1].append(line)
    for bench, (_, lines) in merged.items():
        lines.sort(key=_key)
    return merged


def table(rows: list[list], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def f(x, nd=1):
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else str(x)


def markdown(merged) -> str:
    parts = []
    if "ppl" in merged:
        _, lines = merged["ppl"]
        seg = lines[0]["segment"]
        n = max(len(x["segments"]) for x in lines)
        head = ["policy", "budget", "tokens", "mean ppl"] + [f"{i * seg / 1024:g}-{(i + 1) * seg / 1024:g}K"
                                                             for i in range(n)] + ["tok/s", "note"]
        rows = [[x["policy"], x["budget"] if x["base_policy"] != "full" else "-", x["tokens"], f(x["ppl"], 2)]
                + [f(s) for s in x["segments"]] + [""] * (n - len(x["segments"])) + [f(x["tok_s"]), x["stopped"]]
                for x in lines]
        parts.append("### ppl\n\n" + table(rows, head))
    if "recall" in merged:
        _, lines = merged["recall"]
        distances = sorted({int(d) for x in lines for d in x.get("single_by_distance", {})})
        lags = sorted({int(g) for x in lines for g in x.get("multi_by_lag", {})})
        miles = {g: next(x["multi_by_lag"][str(g)]["mean_distance"] for x in lines if str(g) in x["multi_by_lag"])
                 for g in lags}
        head = (["policy", "budget", "bias"] + [f"single @{d}" for d in distances]
                + [f"multi lag {g} (~{miles[g]} tok)" for g in lags]
                + ["single (95% CI)", "multi (95% CI)", "free-form rate", "best bias"])

        def cell(slot, n="trials"):
            return f"{slot['correct']}/{slot[n]}" if slot else ""

        def overall(x, kind, n):
            if not x[n]:
                return "-"
            low, high = x.get(f"{kind}_ci_low"), x.get(f"{kind}_ci_high")
            return f(x[f"{kind}_accuracy"], 2) + (f" ({low:.2f}-{high:.2f})" if low is not None else "")

        rows = [[x["policy"], x["budget"] if x["base_policy"] != "full" else "-", f(x["bias"], 2)]
                + [cell(x["single_by_distance"].get(str(d))) for d in distances]
                + [cell(x["multi_by_lag"].get(str(g)), "asked") for g in lags]
                + [overall(x, "single", "single_trials"), overall(x, "multi", "multi_questions"),
                   f(x["free_form_rate"], 2),
                   x.get("best_bias", "")] for x in lines]
        parts.append("### recall\n\n" + table(rows, head))
    if "sceneqa" in merged:
        _, lines = merged["sceneqa"]
        labels = list(dict.fromkeys(b for x in lines for b in x["by_bucket"]))
        head = (["policy", "budget", "accuracy (95% CI)", "n"] + [f"lag {b}" for b in labels]
                + ["free-form", "no memory", "not held"])

        def ci(slot):
            return f"{slot['accuracy']:.2f} ({slot['ci_low']:.2f}-{slot['ci_high']:.2f})"

        rows = []
        for x in lines:
            buckets = [x["by_bucket"].get(b) for b in labels]
            rows.append([x["policy"], x["budget"] if x["base_policy"] != "full" else "-", ci(x), x["asked"]]
                        + [f"{b['correct']}/{b['asked']}" if b and b["asked"] else "-" for b in buckets]
                        + [f(x["free_form_rate"], 2), f(x["prior_accuracy"], 2), x["not_held"]])
        parts.append("### sceneqa\n\n" + table(rows, head))
    if "speed" in merged:
        _, lines = merged["speed"]
        head = ["policy", "budget", "prefill tok/s", "decode tok/s", "s/query", "tokens held at end",
                "infmllm/h2o (prefill, decode, query)", "infmllm/streamingllm"]
        rows = []
        for x in lines:
            r = [x["policy"], x["budget"] if x["base_policy"] != "full" else "-", f(x["prefill_tok_s"]),
                 f(x["decode_tok_s"]), f(x["query_s"], 2), x["tokens_held_end"]]
            for o in ("vs_h2o", "vs_streamingllm"):
                v = x.get(o)
                r.append(", ".join(f"{v[k]:.2f}x" for k in ("prefill", "decode", "query")) if v else "")
            rows.append(r)
        parts.append("### speed\n\n" + table(rows, head))
    if "memory" in merged:
        _, lines = merged["memory"]
        head = ["policy", "budget", "frames", "simulated min", "tokens", "start MB", "peak MB", "KV MB at end",
                "ms/frame first 50", "ms/frame last 50", "s/query", "note"]
        rows = []
        for x in lines:
            lat = x["latency_ms"]
            rows.append([x["policy"], x["budget"] if x["base_policy"] != "full" else "-", x["frames"],
                         f(x["minutes"]), x["tokens"], f(x["start_mb"], 0), f(x["peak_mb"], 0), f(x["kv_mb_end"]),
                         f(sum(lat[:50]) / max(1, len(lat[:50]))), f(sum(lat[-50:]) / max(1, len(lat[-50:]))),
                         ", ".join(f"{q:.1f}" for q in x["query_s"]), x["stopped"]])
        parts.append("### memory\n\n" + table(rows, head))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    from . import memory, ppl, recall, sceneqa, speed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    merged = load(args.files)
    print(markdown(merged))
    modules = {"ppl": ppl, "recall": recall, "speed": speed, "memory": memory, "sceneqa": sceneqa}
    for bench, (cfg, lines) in merged.items():
        if bench in modules:
            cfg.out, cfg.quick = args.out, False
            for path in modules[bench].plot(cfg, lines):
                print(f"<!-- plot: {path} -->")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
