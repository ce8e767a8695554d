"""``infmllm-bench``: one entry point, one subcommand per benchmark.

    infmllm-bench ppl    --text text/pg158-emma.txt --policy streamingllm --policy infmllm --budget 1024 --tokens 32768
    infmllm-bench recall --budget 512 --bias 0 --bias 1 --json
    infmllm-bench speed  --budget 1024 --json
    infmllm-bench speed  --peer llama.cpp --threads 1   # + llama.cpp and plain transformers, interleaved
    infmllm-bench memory --video video/vtest.avi --minutes 60 --policy infmllm --policy full
    infmllm-bench sceneqa --minutes 10 --questions 300 --budget 512 --budget 1024 --json --plot
    infmllm-bench gpu    # the prepared GPU run (see benchmarks/gpu.sh)
    infmllm-bench node --rate 1 --rate 5 --duration 180   # the node over DDS vs the engine alone
    infmllm-bench quant  --budget 1024 --tokens 2048   # int8 / int4 weights: ppl cost next to speed

Defaults come from ``config/bench.yaml`` (``--config`` for another file);
``--quick`` switches to tiny sizes. With ``--json`` each policy's result is one
JSON line on stdout; progress bars go to stderr. Results (config + figures) are
saved under ``--out``; ``--plot`` also writes PNG plots there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from .common import COMMANDS, data_file, get_model, load_config, save_results

#: The input files each benchmark reads: looked up before the model loads.
INPUT_FILES = {"ppl": ("text",), "recall": ("text",), "speed": ("text",), "quant": ("text",),
               "memory": ("video",), "node": ("video",)}

DESCRIPTIONS = {
    "ppl": "perplexity of a long text streamed through each policy (per-segment curve + mean)",
    "recall": "long-term recall: planted facts, candidate ranking + free-form answers, bias sweep",
    "speed": "chunked prefill / decode tokens/s and seconds per query, policies interleaved",
    "memory": "peak memory and per-frame latency over a long simulated video (1 frame/s)",
    "sceneqa": "scene-memory QA: questions about real frame lines at lags from seconds to the whole stream",
    "gpu": "the prepared GPU run: ppl, speed, memory at larger scale, plus random-weight VLMs",
    "node": "the real node over DDS beside the engine alone: answer latency, tokens/s, frames/s",
    "quant": "int8 and int4 weights vs float32 on the same stream: perplexity next to prefill/decode speed",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infmllm-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name])
        p.add_argument("--config", help="YAML defaults (default: config/bench.yaml)")
        p.add_argument("--text", help="text file (path, or relative to the shared data folder)")
        p.add_argument("--video", help="video file (path, or relative to the shared data folder)")
        p.add_argument("--policy", dest="policies", action="append",
                       help="full|window|streamingllm|h2o|infmllm, or <policy>-grow (no re-rotation); repeatable")
        p.add_argument("--budget", dest="budgets", action="append", type=int, help="tokens per layer; repeatable")
        p.add_argument("--bias", dest="biases", action="append", type=float,
                       help="Inf-MLLM bias; one infmllm variant per value; repeatable")
        p.add_argument("--tokens", type=int, help="stream length in tokens")
        p.add_argument("--chunk", type=int, help="tokens per chunk (max_chunk_tokens)")
        p.add_argument("--model", help="smollm2, a Hugging Face id or a local folder")
        p.add_argument("--device", help="cpu, cuda, auto")
        p.add_argument("--dtype", help="float32, float16, bfloat16, auto")
        p.add_argument("--threads", type=int, help="torch threads (0: default)")
        p.add_argument("--trials", type=int, help="recall: single-fact trials")
        p.add_argument("--distance", dest="distances", action="append", type=int,
                       help="recall: tokens between the single fact and its question; repeatable")
        p.add_argument("--rounds", type=int, help="recall: rounds of the multi-round scenario")
        p.add_argument("--repeats", type=int, help="speed: interleaved repetitions")
        p.add_argument("--rate", dest="rates", action="append", type=float,
                       help="node: camera frame rate = sample_rate_hz (Hz); repeatable")
        p.add_argument("--duration", dest="duration_s", type=float, help="node: measured seconds per phase")
        p.add_argument("--peer", choices=["llama.cpp"],
                       help="speed: also time llama.cpp (own venv, built on first use) and plain transformers")
        p.add_argument("--minutes", type=float, help="memory, sceneqa: minutes of simulated video")
        p.add_argument("--questions", type=int, help="sceneqa: questions per policy and budget")
        p.add_argument("--time-limit", dest="time_limit_s", type=float,
                       help="memory: seconds per variant before it stops early (0: none)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="any other BenchConfig field (YAML value syntax); repeatable")
        p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in well under a minute")
        p.add_argument("--json", action="store_true", help="one JSON object per line per policy on stdout")
        p.add_argument("--out", help="folder for the results JSON (and plots)")
        p.add_argument("--plot", action="store_true", help="also write PNG plots under --out")
    return parser


def parse(argv: Optional[list] = None):
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("command", "config", "sets", "quick", "json", "plot") and v is not None}
    if args.json:
        overrides["json"] = True
    if args.plot:
        overrides["plot"] = True
    if args.sets:
        import yaml

        for item in args.sets:
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key in ("command", "quick"):
                raise ValueError(f"--set {key}: choose it with the subcommand / --quick, not --set")
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ValueError(f"--set {item!r}: not a YAML value ({exc})") from None
            if not sep or parsed is None:
                raise ValueError(f"--set {item!r} needs a value: --set {key}=VALUE")
            overrides[key] = parsed
    return load_config(args.command, overrides, args.quick, args.config)


def main(argv: Optional[list] = None, lm=None) -> int:
    """Run one benchmark; ``lm`` (a LoadedModel) skips the model load (tests share one).

    Returns 0, or 2 with a one-line reason on stderr when the settings are refused or an input file
    (``--text``, ``--video``) is missing, before any model loads.
    """
    try:
        cfg = parse(argv)
        for name in INPUT_FILES.get(cfg.command, ()):
            data_file(getattr(cfg, name))
    except (ValueError, FileNotFoundError) as exc:
        print(f"infmllm-bench: error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"infmllm_ros.bench.{cfg.command}")
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.command != "gpu":
            lm = get_model(cfg, lm)
        results = module.run(cfg, lm)
        extra = {"torch_threads": torch.get_num_threads()}
        if cfg.plot and hasattr(module, "plot") and results:
            extra["plots"] = [str(p) for p in module.plot(cfg, results, lm)]
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
    path = save_results(cfg, results, extra)
    print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
