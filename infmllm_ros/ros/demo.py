"""``infmllm-demo``: the node watching a real clip, describing it and answering a question.

    infmllm-demo [--video PATH | --bag DIR] [--seconds 40] [--fps 1] [--width 384] [--rate 1]
                 [--scene-period 15] [--question "..." ...] [--threads 1]
                 [--params-file config/stream.yaml] [--cache-dir DIR]

1. makes (or reuses) a small bag from the shared clip ``vtest.avi``
   (``$INFMLLM_SHARED_DATA/video`` or ``<repo>/../shared/data/video``; a
   generated clip of moving shapes if it is absent) with ``video2bag``:
   ``--seconds`` of video, one frame per ``1/--fps`` s, ``--width`` px wide;
2. starts the ``infmllm`` node in this process with ``config/stream.yaml``
   (offline SmolLM2 preset) and replays the bag into it (:class:`BagPlayer`);
3. prints each frame's line as it goes into memory (``[frame]``: objects per
   class with where and in which colour, and the tracks' events) and each
   SceneDescription as it arrives, then asks the questions (by default one
   about people, one about the colour of the parked van) and prints each
   answer with the span of frames it came from, and the cache statistics;
4. shuts down cleanly (Ctrl-C at any point too).

Everything runs offline on the bundled defaults; on 2 CPU cores it takes about
1.5-2 minutes (model load 30-45 s, the replay ``--seconds / --rate``, the answer).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

#: One question about people, one about an object (the sample clip's parked van, which YOLO calls a truck).
DEFAULT_QUESTIONS = ("How many people were visible recently, and where?", "What colour was the truck?")
TOPIC = "/camera/image_raw"


def _stamp_str(t) -> str:
    secs = t.sec + t.nanosec * 1e-9
    if secs <= 0:
        return "-"
    return datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%H:%M:%S.%f")[:-4]


def find_clip(explicit: Optional[str]) -> Optional[Path]:
    """The demo video: ``explicit``, else the shared vtest.avi, else None."""
    from .params import source_root

    if explicit:
        return Path(explicit)
    roots = [os.environ.get("INFMLLM_SHARED_DATA", ""), str(source_root().parent / "shared" / "data"),
             str(Path.cwd().parent / "shared" / "data")]
    for root in roots:
        if root and (Path(root) / "video" / "vtest.avi").is_file():
            return Path(root) / "video" / "vtest.avi"
    return None


def generate_clip(path: Path, seconds: int = 40, fps: int = 10) -> Path:
    """A small synthetic clip (moving figures on a lawn) for when no real one is around."""
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = 384, 288
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    rng = np.random.default_rng(0)
    walkers = [(rng.uniform(0, w), rng.uniform(60, h - 100), rng.uniform(-4, 4)) for _ in range(3)]
    for i in range(seconds * fps):
        img = np.full((h, w, 3), (60, 140, 60), np.uint8)
        for x0, y0, vx in walkers:
            x = int((x0 + vx * i) % w)
            cv2.ellipse(img, (x, int(y0)), (6, 8), 0, 0, 360, (180, 200, 230), -1)
            cv2.rectangle(img, (x - 8, int(y0) + 8), (x + 8, int(y0) + 50), (90, 40, 30), -1)
        out.write(img)
    out.release()
    return path


def make_bag(video: Path, cache: Path, seconds: int, fps: float, width: int) -> Path:
    """Write (or reuse) a bag of ``seconds`` of ``video`` at ``fps`` frames per video second."""
    import cv2

    from .video2bag import write_bag

    cap = cv2.VideoCapture(str(video))
    src_fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    cap.release()
    every = max(1, int(round(src_fps / fps)))
    bag = cache / f"{video.stem}_{seconds}s_{fps:g}fps_{width}px_bag"
    if (bag / "metadata.yaml").is_file():
        print(f"[demo] reusing bag {bag}", flush=True)
        return bag
    if bag.exists():  # a half-written one from an interrupted run
        import shutil

        shutil.rmtree(bag)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    s = write_bag(video, bag, topic=TOPIC, fps=fps, width=width, every=every,
                  max_frames=int(seconds * fps), frame_id="camera_optical")
    print(f"[demo] wrote {s.frames} frames ({s.width}x{s.height}) of {video.name} to {bag} "
          f"in {time.monotonic() - t:.1f} s", flush=True)
    return bag


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infmllm-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", default=None, help="video to use (default: the shared vtest.avi)")
    p.add_argument("--bag", default=None, help="play this existing bag instead of making one")
    p.add_argument("--seconds", type=int, default=40, help="seconds of video in the bag (default 40)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per video second (default 1)")
    p.add_argument("--width", type=int, default=384, help="frame width in the bag (default 384)")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor (default 1)")
    p.add_argument("--scene-period", type=float, default=15.0,
                   help="seconds between SceneDescriptions (default 15; 0: off)")
    p.add_argument("--question", action="append", default=None,
                   help="a question asked at the end (repeatable; default: one about people, one about "
                        "the parked van of the sample clip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (model.num_threads). Default 1: on a 2-core machine "
                        "shared with DDS, OpenCV and other processes it was 3-10x faster than "
                        "torch's default; 0: torch's default (one per core)")
    p.add_argument("--params-file", default=None, help="node parameters (default config/stream.yaml)")
    p.add_argument("--cache-dir", default=os.environ.get(
        "INFMLLM_CACHE", str(Path.home() / ".cache" / "infmllm_ros" / "demo")),
        help="where demo bags are kept (default ~/.cache/infmllm_ros/demo, or $INFMLLM_CACHE)")
    return p


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    from rclpy.qos import QoSProfile

    from infmllm_ros.msg import SceneDescription
    from infmllm_ros.srv import GetStats, Query

    from .node import InfMllmNode
    from .params import ParameterError, find_data_file
    from .replay import BagPlayer

    cache = Path(args.cache_dir).expanduser()
    if args.bag:
        bag = Path(args.bag)
    else:
        video = find_clip(args.video)
        if video is None:
            video = cache / "generated_clip.avi"
            if not video.is_file():
                print("[demo] shared clip not found: generating a synthetic one", flush=True)
                generate_clip(video)
        bag = make_bag(video, cache, args.seconds, args.fps, args.width)
    params_file = args.params_file or str(find_data_file("config", "stream.yaml"))
    print(f"[demo] parameters: {params_file}", flush=True)

    rclpy.init(args=["infmllm-demo", "--ros-args", "--params-file", params_file,
                     "-p", f"scene.period_s:={float(args.scene_period)}",
                     "-p", "cameras.names:=[front]", "-p", f"cameras.front.topic:={TOPIC}",
                     "-p", f"model.num_threads:={int(args.threads)}"])
    node: Optional[InfMllmNode] = None
    executor: Optional[MultiThreadedExecutor] = None
    demo = player = None
    spin_thread = None
    code = 0
    try:
        node = InfMllmNode()
        demo = rclpy.create_node("infmllm_demo")
        fqn = node.get_fully_qualified_name()
        clip_start = [None]

        def on_scene(m: SceneDescription) -> None:
            rel = ""
            if clip_start[0] is not None:
                rel = f" (clip +{m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 - clip_start[0]:.0f} s)"
            print(f"\n[scene {_stamp_str(m.header.stamp)}{rel}, frame {m.header.frame_id}] {m.text}\n"
                  f"        cache {m.cache_tokens}/{m.cache_budget_tokens} tokens "
                  f"({m.cache_bytes / 2**20:.1f} MiB), {m.frames_encoded} frames encoded, "
                  f"memory spans {_stamp_str(m.oldest_frame_stamp)} .. "
                  f"{_stamp_str(m.newest_frame_stamp)}", flush=True)

        demo.create_subscription(SceneDescription, f"{fqn}/scene", on_scene, QoSProfile(depth=10))
        query = demo.create_client(Query, f"{fqn}/query")
        stats = demo.create_client(GetStats, f"{fqn}/get_stats")
        player = BagPlayer(demo, bag, rate=args.rate)
        executor = MultiThreadedExecutor(num_threads=node.executor_threads() + 2)
        executor.add_node(node)
        executor.add_node(demo)
        spin_thread = threading.Thread(target=executor.spin, daemon=True)
        spin_thread.start()

        if not player.wait_for_subscribers(timeout=20.0):
            raise RuntimeError("the node did not subscribe to the bag's topic")
        print(f"[demo] replaying {bag.name} at x{args.rate:g} ...", flush=True)
        t = time.monotonic()
        player.start()
        shown = [None]

        def show_line() -> None:  # the offline encoder's newest line, once
            obs = getattr(node.encoder, "last_observation", None)
            if obs is not None and obs is not shown[0]:
                shown[0] = obs
                print(f"[frame] {obs.text}", flush=True)

        while player.running:
            if clip_start[0] is None and node.worker.book.newest is not None:
                clip_start[0] = node.worker.book.newest.seconds  # first frame appended
            show_line()
            time.sleep(0.05)
        if player.error is not None:
            raise player.error
        print(f"[demo] replay done: {player.published} frames in {time.monotonic() - t:.0f} s",
              flush=True)
        time.sleep(2.0 / max(node.settings.sample_rate_hz, 0.5))  # let the last frame in
        show_line()

        for question in args.question or DEFAULT_QUESTIONS:
            print(f"\n[query] {question}", flush=True)
            fut = query.call_async(Query.Request(question=question))
            while not fut.done():
                time.sleep(0.05)
            r = fut.result()
            if r.success:
                print(f"[answer] {r.answer}\n         from frames {_stamp_str(r.oldest_frame_stamp)} .. "
                      f"{_stamp_str(r.newest_frame_stamp)}; {r.prompt_tokens} prompt + "
                      f"{r.generated_tokens} generated tokens in {r.latency_s:.1f} s", flush=True)
            else:
                print(f"[answer] refused: {r.message}", flush=True)
                code = 1
        fut = stats.call_async(GetStats.Request())
        while not fut.done():
            time.sleep(0.05)
        s = fut.result()
        print(f"[stats] policy {s.policy}: cache {s.cache_tokens}/{s.cache_budget_tokens} tokens, "
              f"{s.cache_bytes / 2**20:.1f}/{s.cache_budget_bytes / 2**20:.1f} MiB; "
              f"{s.tokens_seen} tokens seen, {s.tokens_evicted} evicted; frames received "
              f"{s.frames_received}, encoded {s.frames_encoded}, dropped {s.frames_dropped}",
              flush=True)
    except ParameterError as exc:
        print(f"[demo] cannot start the node: {exc}", file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        print("\n[demo] interrupted", flush=True)
    finally:
        if player is not None:
            player.stop()
        if node is not None:
            node.shutdown()
        if executor is not None:
            executor.shutdown(timeout_sec=10.0)
        if player is not None:
            player.destroy()
        if demo is not None:
            demo.destroy_node()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        if spin_thread is not None:
            spin_thread.join(5.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
