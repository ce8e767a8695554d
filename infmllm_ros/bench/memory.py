"""Memory: peak memory and per-frame latency against stream length, over a long simulated video.

The shared clip is looped and sampled at ``fps`` frames per second of stream
time, through the offline pipeline (YOLOv3-tiny + ByteTrack describer -> one
line of text per frame -> tokens), for ``minutes`` of simulated video. By
default the clip's sampled frames are described once (cached under ``--out``,
keyed by the describer's fingerprint) and their lines replayed with the
simulated stamps (``describe_live: true`` describes every frame instead). Every
``query_every_s`` seconds of stream time a question is asked (``Stream.ask``).

Describe cost, in the same run (:func:`describe_comparison`): on the first
``describe_frames`` sampled frames, interleaved frame by frame so both see the
same machine load, the detector alone, the whole line (detector, tracker,
colours, wording) and the previous HOG/Haar describer, in ms per frame, their
ratios, whether the whole line keeps up with ``fps``, and the mean tokens per
line of each (the model's tokenizer). Every result line carries these
``describe_*`` / ``tokens_per_line*`` figures.

Memory: process RSS (psutil) on a CPU, ``torch.cuda.max_memory_allocated`` on
a GPU, plus the KV cache's own bytes. ``full`` has no budget: it stops at the
model's context (or ``time_limit_s``) and says where.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .common import (BenchConfig, clip_observations, data_file, emit, get_model, progress, pyplot, record, run_label,
                     save_figure, variants, video_frames)

QUESTION = "How many people were seen most recently, and where?"


def describe_comparison(cfg: BenchConfig, lm) -> dict:
    """Per-frame cost of the detector alone, the whole line and the HOG/Haar describer, side by side.

    The three run on the same ``describe_frames`` sampled frames, interleaved frame by frame
    (so a busy machine slows all three alike); each keeps its own tracking / motion state as
    in the node. Times are wall-clock ms per frame (mean and median); the ratios are of means.
    """
    import cv2

    from infmllm_ros.perception.describer import FrameDescriber
    from infmllm_ros.perception.hog import HogHaarDescriber

    if cfg.describe_frames <= 0:
        return {}
    if cfg.threads:
        cv2.setNumThreads(cfg.threads)
    line = FrameDescriber()
    detector = line.detector
    hog = HogHaarDescriber()
    times: dict[str, list[float]] = {"detector": [], "line": [], "hog": []}
    tokens: dict[str, list[int]] = {"line": [], "hog": []}
    frames = 0
    for clip_t, frame in video_frames(data_file(cfg.video), cfg.fps):
        if frames >= cfg.describe_frames:
            break
        stamp = 1_700_000_000.0 + clip_t
        t = time.perf_counter()
        detector.detect(frame)
        times["detector"].append(time.perf_counter() - t)
        for name, describer in (("line", line), ("hog", hog)):
            t = time.perf_counter()
            text = describer.describe(frame, "front", stamp).text
            times[name].append(time.perf_counter() - t)
            tokens[name].append(len(lm.tokenizer(text + "\n", add_special_tokens=False)["input_ids"]))
        frames += 1
    ms = {k: 1000.0 * sum(v) / max(1, len(v)) for k, v in times.items()}
    median = {k: 1000.0 * sorted(v)[len(v) // 2] if v else 0.0 for k, v in times.items()}
    return {
        "describe_frames": frames, "describe_detector": detector.description,
        "describe_detector_ms": round(ms["detector"], 1), "describe_line_ms": round(ms["line"], 1),
        "describe_hog_ms": round(ms["hog"], 1),
        "describe_detector_median_ms": round(median["detector"], 1),
        "describe_line_median_ms": round(median["line"], 1), "describe_hog_median_ms": round(median["hog"], 1),
        "describe_line_vs_hog": round(ms["line"] / ms["hog"], 3) if ms["hog"] else 0.0,
        "describe_detector_vs_hog": round(ms["detector"] / ms["hog"], 3) if ms["hog"] else 0.0,
        "describe_keeps_up": bool(ms["line"] / 1000.0 < 1.0 / cfg.fps),
        "opencv_threads": cv2.getNumThreads(),
        "tokens_per_line": round(sum(tokens["line"]) / max(1, frames), 1),
        "tokens_per_line_hog": round(sum(tokens["hog"]) / max(1, frames), 1),
    }


def _memory_mb(lm) -> float:
    if lm.device.type == "cuda":
        return torch.cuda.max_memory_allocated(lm.device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    from infmllm_ros.engine import Chunk, Stream
    from infmllm_ros.perception.describer import FrameDescriber
    from infmllm_ros.perception.encoders import OfflineTextEncoder

    lm = get_model(cfg, lm)
    context = int(getattr(lm.text_config, "max_position_embeddings", 0) or 0)
    frames_total = int(round(cfg.minutes * 60 * cfg.fps))
    comparison = describe_comparison(cfg, lm)
    observations, describe_s = ([], 0.0) if cfg.describe_live else clip_observations(
        cfg.video, cfg.fps, "front", cfg.out, cfg.clip_frames)
    formatter = FrameDescriber()
    t0 = 1_700_000_000.0
    results = []
    for budget in cfg.budgets:
        for variant in variants(cfg, int(budget)):
            stream = Stream(lm, variant.stream_config(cfg))
            encoder = OfflineTextEncoder(lm.tokenizer) if cfg.describe_live else None
            live = _loop_frames(cfg) if cfg.describe_live else None
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(lm.device)
            start_mb = _memory_mb(lm)
            latency_ms, mem_mb, held, queries, query_at = [], [], [], [], []
            stopped, frames = "", 0
            started = time.perf_counter()
            next_query = cfg.query_every_s
            bar = progress(frames_total, f"memory {variant.label} b={budget}", unit="frame")
            try:
                for i in range(frames_total):
                    stamp = t0 + i / cfg.fps
                    if encoder is not None:
                        chunk = encoder.encode(next(live), "front", stamp)
                    else:
                        obs = replace(observations[i % len(observations)], stamp=stamp)
                        text = formatter.format_line(obs) + "\n"
                        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                        chunk = Chunk(input_ids=ids, kind="frame", camera="front", stamp=stamp, text=text)
                    if variant.policy == "full" and context and stream.cache.next_position + len(chunk) + 64 > context:
                        stopped = f"stopped after {frames} frames ({i / cfg.fps / 60:.1f} min): the model's context"
                        break
                    if cfg.time_limit_s and time.perf_counter() - started > cfg.time_limit_s:
                        stopped = f"stopped after {frames} frames ({i / cfg.fps / 60:.1f} min): time limit"
                        break
                    if lm.device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    stream.append_chunk(chunk)
                    if lm.device.type == "cuda":
                        torch.cuda.synchronize()
                    latency_ms.append((time.perf_counter() - t) * 1000)
                    mem_mb.append(_memory_mb(lm))
                    held.append(stream.cache.tokens_held)
                    frames += 1
                    if (i + 1) / cfg.fps >= next_query:
                        queries.append(stream.ask(QUESTION, max_new_tokens=16).latency_s)
                        query_at.append(frames)
                        next_query += cfg.query_every_s
                    bar.update(1)
                stats = stream.stats()
            finally:
                bar.close()
                stream.close()
            line = record(cfg, lm, variant, tokens=stats.tokens_seen, frames=frames,
                          minutes=frames / cfg.fps / 60, fps=cfg.fps, video=cfg.video,
                          describe="live" if cfg.describe_live else "replayed", describe_s_per_frame=describe_s,
                          clip_frames=len(observations), peak_mb=max(mem_mb, default=start_mb), start_mb=start_mb,
                          memory_kind="cuda_max_allocated" if lm.device.type == "cuda" else "rss",
                          kv_mb_end=stats.bytes_held / 2**20, tokens_held_end=stats.tokens_held,
                          latency_ms=[round(x, 2) for x in latency_ms], memory_mb=[round(x, 1) for x in mem_mb],
                          tokens_held=held, query_s=queries, query_at_frame=query_at,
                          mean_latency_ms=sum(latency_ms) / max(1, len(latency_ms)), stopped=stopped,
                          seconds=round(time.perf_counter() - started, 1), **comparison)
            emit(cfg, line)
            results.append(line)
    return results


def _loop_frames(cfg: BenchConfig):
    video = data_file(cfg.video)
    while True:
        for _, frame in video_frames(video, cfg.fps):
            yield frame


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for r in results:
        xs = [(i + 1) / r["fps"] / 60 for i in range(len(r["latency_ms"]))]
        label = f"{r['policy']} b={r['budget']}" if r["base_policy"] != "full" else "full"
        window = 20
        lat = r["latency_ms"]
        smooth = [sum(lat[max(0, i - window + 1):i + 1]) / len(lat[max(0, i - window + 1):i + 1])
                  for i in range(len(lat))]
        axes[0].plot(xs, smooth, label=label)
        axes[1].plot(xs, r["memory_mb"], label=label)
        axes[2].plot(xs, r["tokens_held"], label=label)
    axes[0].set_ylabel("ms per frame (20-frame mean)")
    axes[1].set_ylabel("RSS MB" if results[0]["memory_kind"] == "rss" else "CUDA max allocated MB")
    axes[2].set_ylabel("KV tokens held per layer")
    for ax in axes:
        ax.set_xlabel("simulated video (minutes, 1 frame/s)")
        ax.legend(fontsize=8)
    r0 = results[0]
    fig.suptitle(f"Long video stream ({r0['video']} looped, frames {r0['describe']}); " +
                 run_label(r0), fontsize=8)
    path = save_figure(fig, cfg, "memory")
    return [path]
