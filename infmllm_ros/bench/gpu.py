"""The prepared GPU run: ppl, speed and memory at a larger scale, plus random-weight VLMs at real sizes.

``infmllm-bench gpu`` (or ``bash benchmarks/gpu.sh``) runs, on one CUDA device
in bfloat16, with the sizes of the ``gpu`` section of ``config/bench.yaml``:

1. ``ppl``, ``speed`` and ``memory`` with SmolLM2 (sizes in ``parts``);
2. the VLM path: for each family of ``vlm_families`` (``qwen2_5_vl``:
   Qwen2.5-VL-3B sizes; ``idefics3``: SmolVLM-256M sizes) a model of the real
   transformers class with random weights (``build_random_vlm``), frames of
   the shared clip through :class:`~infmllm_ros.perception.vlm.VlmEncoder`
   (Qwen: ``vlm_max_pixels`` = 256 visual tokens a frame), Inf-MLLM at
   ``vlm_budget`` against the full cache: frames/s sustained, memory per
   frame, query latency. Random weights: answers are noise; speed and memory
   are what the real architecture costs.

With ``--quick`` it runs everything tiny (``vlm_size: tiny``), which also
works on a CPU: that is how the script is tested where no GPU is.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .common import (BenchConfig, data_file, emit, get_model, progress, pyplot, record, save_figure, save_results,
                     variants)

QUESTION = "What did the camera see most recently?"


def _part_config(cfg: BenchConfig, part: str) -> BenchConfig:
    overrides = dict(cfg.parts.get(part) or {})
    base = replace(cfg, command=part, policies=list(cfg.policies), budgets=list(cfg.budgets),
                   biases=list(cfg.biases), parts={})
    return replace(base, **overrides).validate()


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    """Parts in order of what only a GPU can show first (speed, VLMs, memory, then the long ppl run).

    Each part's lines are printed as they finish and saved (``gpu_partial_*.json``),
    so a run cut short by the time limit keeps what it measured.
    """
    from . import memory, ppl, speed

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("the gpu benchmark asks for CUDA, which is not available here (try --quick --device cpu)")
    lm = get_model(cfg, lm)
    results: list[dict] = []
    for part, module in (("speed", speed), ("vlm", None), ("memory", memory), ("ppl", ppl)):
        if module is None:
            results.extend(vlm_part(cfg, lm))
        elif part in cfg.parts:
            sub = _part_config(cfg, part)
            lines = module.run(sub, lm)
            if cfg.plot and lines:
                module.plot(sub, lines, lm)
            results.extend(lines)
        if not cfg.quick:
            save_results(replace(cfg, command="gpu"), results, {"partial_after": part})
    return results


def vlm_part(cfg: BenchConfig, text_lm) -> list[dict]:
    """Random-weight VLMs of the real classes: frames/s, memory and query latency, Inf-MLLM vs full."""
    from infmllm_ros.engine import Stream
    from infmllm_ros.perception.random_vlm import build_random_vlm
    from infmllm_ros.perception.vlm import VlmEncoder

    from .common import video_frames
    from .memory import _memory_mb

    video = data_file(cfg.video)
    frames = [f for _, f in video_frames(video, 1.0)]
    out = []
    for family in cfg.vlm_families:
        started = time.perf_counter()
        vlm = build_random_vlm(family, size=cfg.vlm_size, text_tokenizer=text_lm.tokenizer, seed=cfg.seed,
                               dtype=text_lm.dtype, device=text_lm.device)
        build_s = time.perf_counter() - started
        options = {"max_pixels": cfg.vlm_max_pixels} if family == "qwen2_5_vl" else {}
        encoder = VlmEncoder(vlm, **options)
        frame_tokens = len(encoder.encode(frames[0], "front", 1_700_000_000.0))
        chunk = max(cfg.chunk, frame_tokens + 32)
        budget = max(cfg.vlm_budget, cfg.sinks + cfg.recent + chunk + 1)
        for v in variants(replace(cfg, biases=[cfg.biases[0]]), budget, ["infmllm", "full"]):
            stream = Stream(vlm, v.stream_config(cfg, chunk=chunk))
            compile_s = stream.warmup()  # the compiled decode step (compile auto: CUDA), outside the timings
            if vlm.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(vlm.device)
            latency_ms, mem_mb, queries = [], [], []
            bar = progress(cfg.vlm_frames, f"vlm {family} {v.label}", unit="frame")
            t_all = time.perf_counter()
            try:
                for i in range(cfg.vlm_frames):
                    t = time.perf_counter()
                    stream.append_chunk(encoder.encode(frames[i % len(frames)], "front", 1_700_000_000.0 + i))
                    if vlm.device.type == "cuda":
                        torch.cuda.synchronize()
                    latency_ms.append((time.perf_counter() - t) * 1000)
                    mem_mb.append(_memory_mb(vlm))
                    if (i + 1) % max(1, cfg.vlm_frames // 4) == 0:
                        answer = stream.ask(QUESTION, max_new_tokens=16)
                        queries.append({"frame": i + 1, "s": answer.latency_s, "tokens": answer.generated_tokens})
                    bar.update(1)
                total = time.perf_counter() - t_all
                stats = stream.stats()
            finally:
                bar.close()
                stream.close()
            line = record(replace(cfg, command="vlm"), vlm, v, budget=budget if v.policy != "full" else 0,
                          family=family, size=cfg.vlm_size, build_s=build_s, frame_tokens=frame_tokens,
                          chunk=chunk, frames=cfg.vlm_frames, tokens=stats.tokens_seen, compile_s=compile_s,
                          frames_per_s=cfg.vlm_frames / total, mean_frame_ms=sum(latency_ms) / len(latency_ms),
                          peak_mb=max(mem_mb), memory_mb=[round(x, 1) for x in mem_mb],
                          latency_ms=[round(x, 2) for x in latency_ms], query_s=[q["s"] for q in queries],
                          queries=queries, tokens_held_end=stats.tokens_held, kv_mb_end=stats.bytes_held / 2**20,
                          memory_kind="cuda_max_allocated" if vlm.device.type == "cuda" else "rss")
            emit(cfg, line)
            out.append(line)
        del vlm, encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    rows = [r for r in results if r.get("bench") == "vlm"]
    if not rows:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        xs = range(1, len(r["memory_mb"]) + 1)
        axes[0].plot(xs, r["memory_mb"], label=f"{r['family']} {r['policy']}")
        axes[1].plot(xs, r["latency_ms"], label=f"{r['family']} {r['policy']}")
    axes[0].set_ylabel("memory MB")
    axes[1].set_ylabel("ms per frame")
    for ax in axes:
        ax.set_xlabel("frame")
        ax.legend(fontsize=7)
    fig.suptitle(f"Random-weight VLMs ({rows[0]['size']} sizes), {rows[0]['dtype']} on {rows[0]['machine']}",
                 fontsize=8)
    path = save_figure(fig, cfg, "gpu_vlm")
    return [path]
