"""``infmllm-video2bag``: turn a video file into a ROS 2 bag of camera images.

    infmllm-video2bag VIDEO OUT_BAG [--topic /camera/image_raw] [--fps F]
        [--compressed] [--frame-id camera] [--max-frames N] [--start-time SEC]
        [--width W] [--skip N] [--every N] [--encoding rgb8|bgr8]
        [--storage sqlite3|mcap]

Each frame becomes one ``sensor_msgs/msg/Image`` (rgb8 or bgr8) or, with
``--compressed``, one ``sensor_msgs/msg/CompressedImage`` (jpeg). Header stamps
are real: ``start_time + i / fps`` for the i-th written frame, and the bag's
receive time equals the stamp, so a replay reproduces the camera's timing.

Written with the pure-Python ``rosbags`` package (no rclpy, no rosbag2): the
sqlite3 storage by default (what every rosbag2 reads), mcap on request.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from .images import encode_compressed

__all__ = ["BagSummary", "VideoToBagError", "write_bag", "main"]

DEFAULT_TOPIC = "/camera/image_raw"


class VideoToBagError(RuntimeError):
    """A problem with the input video or the output bag; the message says which."""


@dataclass
class BagSummary:
    """What :func:`write_bag` wrote."""

    path: Path
    topic: str
    msgtype: str
    frames: int
    width: int
    height: int
    fps: float
    first_stamp: float
    last_stamp: float
    storage: str


def write_bag(
    video: str | Path,
    out_bag: str | Path,
    *,
    topic: Optional[str] = None,
    fps: Optional[float] = None,
    compressed: bool = False,
    frame_id: str = "camera",
    max_frames: Optional[int] = None,
    start_time: Optional[float] = None,
    width: Optional[int] = None,
    skip: int = 0,
    every: int = 1,
    encoding: str = "rgb8",
    jpeg_quality: int = 90,
    storage: str = "sqlite3",
    progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> BagSummary:
    """Write the frames of ``video`` to a new ROS 2 bag at ``out_bag``.

    Args:
        video: any file OpenCV's video reader opens.
        out_bag: the bag directory to create; it must not exist.
        topic: defaults to ``/camera/image_raw`` (``.../compressed`` with
            ``compressed``, as image_transport names it).
        fps: stamp spacing is ``1 / fps``; defaults to the video's own rate.
            Frames are not dropped or repeated: a different ``fps`` replays
            the clip faster or slower.
        compressed: write jpeg CompressedImage instead of raw Image.
        frame_id: the header frame_id of every message.
        max_frames: stop after writing this many frames.
        start_time: stamp of the first frame in seconds since the epoch;
            defaults to now.
        width: resize frames to this width, keeping the aspect ratio.
        skip: source frames to skip at the start of the clip.
        every: keep every N-th source frame (after ``skip``).
        encoding: ``rgb8`` or ``bgr8`` for raw images.
        storage: ``sqlite3`` or ``mcap``.
        progress: called as ``progress(written, expected_or_None)``.

    Raises:
        VideoToBagError: missing or unreadable video, existing output, bad option.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.rosbag2.errors import WriterError
    from rosbags.typesys import Stores, get_typestore

    video, out_bag = Path(video), Path(out_bag)
    if not video.is_file():
        raise VideoToBagError(f"video not found: {video}")
    if out_bag.exists():
        raise VideoToBagError(f"output exists already, not overwriting: {out_bag}")
    if encoding not in ("rgb8", "bgr8"):
        raise VideoToBagError(f"--encoding must be rgb8 or bgr8, not {encoding!r}")
    if storage not in ("sqlite3", "mcap"):
        raise VideoToBagError(f"--storage must be sqlite3 or mcap, not {storage!r}")
    if max_frames is not None and max_frames < 1:
        raise VideoToBagError(f"--max-frames must be at least 1, got {max_frames}")
    if skip < 0 or every < 1:
        raise VideoToBagError(f"--skip must be >= 0 and --every >= 1, got {skip} and {every}")
    if width is not None and width < 2:
        raise VideoToBagError(f"--width must be at least 2, got {width}")
    if not 1 <= jpeg_quality <= 100:
        raise VideoToBagError(f"jpeg quality must be in 1..100, got {jpeg_quality}")

    capture = cv2.VideoCapture(str(video))
    try:
        if not capture.isOpened():
            raise VideoToBagError(f"OpenCV cannot open {video} as a video (unknown container or codec?)")
        video_fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if fps is None:
            if not math.isfinite(video_fps) or video_fps <= 0:
                raise VideoToBagError(f"{video} does not state its frame rate; pass --fps")
            fps = video_fps
        if not math.isfinite(fps) or fps <= 0:
            raise VideoToBagError(f"--fps must be positive, got {fps}")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        expected = max(0, (total - skip + every - 1) // every) if total > 0 else None
        if expected is not None and max_frames is not None:
            expected = min(expected, max_frames)

        start = time.time() if start_time is None else float(start_time)
        if not math.isfinite(start) or start < 0:
            raise VideoToBagError(f"--start-time must be a non-negative number of seconds, got {start_time}")
        # Through the decimal text, not float * 1e9: a float epoch time is ~100 ns off at 1e9 s.
        start_ns = time.time_ns() if start_time is None else int(Decimal(repr(start)) * 1_000_000_000)
        topic = topic or (DEFAULT_TOPIC + "/compressed" if compressed else DEFAULT_TOPIC)

        store = get_typestore(Stores.ROS2_KILTED)
        msgtype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        message_class = store.types[msgtype]
        header_class = store.types["std_msgs/msg/Header"]
        time_class = store.types["builtin_interfaces/msg/Time"]

        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        try:
            writer = Writer(out_bag, version=9, storage_plugin=plugin)
            writer.open()
        except WriterError as err:
            raise VideoToBagError(f"cannot create bag {out_bag}: {err}") from None

        written, source_index = 0, -1
        size = (0, 0)
        stamps = (0.0, 0.0)
        try:
            connection = writer.add_connection(topic, msgtype, typestore=store)
            while max_frames is None or written < max_frames:
                ok, bgr = capture.read()
                if not ok:
                    break
                source_index += 1
                if source_index < skip or (source_index - skip) % every:
                    continue
                if width is not None and bgr.shape[1] != width:
                    height = max(1, round(bgr.shape[0] * width / bgr.shape[1]))
                    interp = cv2.INTER_AREA if width < bgr.shape[1] else cv2.INTER_LINEAR
                    bgr = cv2.resize(bgr, (width, height), interpolation=interp)
                # Integer nanoseconds from the frame index, so spacing is exact
                # and does not drift over long clips.
                stamp_ns = start_ns + int(round(written * 1e9 / fps))
                header = header_class(
                    stamp=time_class(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000),
                    frame_id=frame_id,
                )
                if compressed:
                    data = encode_compressed(np.ascontiguousarray(bgr[:, :, ::-1]), "jpeg", jpeg_quality)
                    msg = message_class(header=header, format="jpeg", data=np.frombuffer(data, np.uint8))
                else:
                    pixels = bgr if encoding == "bgr8" else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    h, w = pixels.shape[:2]
                    msg = message_class(
                        header=header, height=h, width=w, encoding=encoding, is_bigendian=0,
                        step=w * 3, data=np.ascontiguousarray(pixels).reshape(-1),
                    )
                writer.write(connection, stamp_ns, store.serialize_cdr(msg, msgtype))
                if written == 0:
                    size = (bgr.shape[1], bgr.shape[0])
                    stamps = (stamp_ns / 1e9, stamp_ns / 1e9)
                stamps = (stamps[0], stamp_ns / 1e9)
                written += 1
                if progress is not None:
                    progress(written, expected)
        finally:
            writer.close()
    finally:
        capture.release()

    if written == 0:
        _remove_bag(out_bag)
        raise VideoToBagError(f"no frame could be read from {video} (skip={skip}); nothing written")
    return BagSummary(
        path=out_bag, topic=topic, msgtype=msgtype, frames=written, width=size[0], height=size[1],
        fps=float(fps), first_stamp=stamps[0], last_stamp=stamps[1], storage=storage,
    )


def _remove_bag(path: Path) -> None:
    """Remove a bag directory this run created and left empty of messages."""
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infmllm-video2bag",
        description="Write the frames of a video file to a ROS 2 bag as sensor_msgs Image or CompressedImage.",
    )
    p.add_argument("video", help="input video file (anything OpenCV reads)")
    p.add_argument("out_bag", help="bag directory to create (must not exist)")
    p.add_argument("--topic", default=None,
                   help=f"topic name (default {DEFAULT_TOPIC}, or {DEFAULT_TOPIC}/compressed with --compressed)")
    p.add_argument("--fps", type=float, default=None,
                   help="stamp spacing 1/FPS (default: the video's frame rate); frames are not dropped")
    p.add_argument("--compressed", action="store_true", help="write jpeg CompressedImage messages")
    p.add_argument("--jpeg-quality", type=int, default=90, help="jpeg quality 1..100 (default 90)")
    p.add_argument("--frame-id", default="camera", help="header frame_id (default camera)")
    p.add_argument("--max-frames", type=int, default=None, help="write at most N frames")
    p.add_argument("--start-time", type=float, default=None,
                   help="stamp of the first frame, seconds since the epoch (default: now)")
    p.add_argument("--width", type=int, default=None, help="resize to this width, keeping the aspect ratio")
    p.add_argument("--skip", type=int, default=0, help="skip the first N frames of the video")
    p.add_argument("--every", type=int, default=1, help="keep every N-th frame (default 1: all)")
    p.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8", help="raw image encoding")
    p.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3", help="bag storage plugin")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    last_print = [0.0]

    def progress(done: int, expected: Optional[int]) -> None:
        now = time.monotonic()
        if args.quiet or (now - last_print[0] < 1.0 and done != expected):
            return
        last_print[0] = now
        of = f"/{expected}" if expected else ""
        print(f"\r  {done}{of} frames", end="", file=sys.stderr, flush=True)

    try:
        summary = write_bag(
            args.video, args.out_bag, topic=args.topic, fps=args.fps, compressed=args.compressed,
            frame_id=args.frame_id, max_frames=args.max_frames, start_time=args.start_time,
            width=args.width, skip=args.skip, every=args.every, encoding=args.encoding,
            jpeg_quality=args.jpeg_quality, storage=args.storage, progress=progress,
        )
    except VideoToBagError as err:
        print(f"infmllm-video2bag: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninfmllm-video2bag: interrupted; the bag written so far was closed", file=sys.stderr)
        return 130
    if not args.quiet:
        print(file=sys.stderr)
    kind = "jpeg CompressedImage" if args.compressed else f"{args.encoding} Image"
    print(
        f"wrote {summary.frames} frames ({summary.width}x{summary.height} {kind}) on {summary.topic} "
        f"to {summary.path} [{summary.storage}], stamps {summary.first_stamp:.3f} .. {summary.last_stamp:.3f} "
        f"at {summary.fps:g} fps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
