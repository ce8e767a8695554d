"""The HOG/Haar describer (the benchmark baseline, perception/hog.py) on real frames of the shared clips.

The frame numbers and the people in them were checked by eye on saved frames
(see the notes in infmllm_ros/perception/hog.py):

* vtest.avi frame 0: three pedestrians, one standing left of centre at about
  x 255-285, y 220-307 (of 768x576), one walking at x 500-530 and one at x 640-685.
* vtest.avi frame 400: three pedestrians, one at about x 275-300, y 200-285.
* one-by-one-person-detection.mp4 frame 300: one man standing, back to the
  camera, in the middle of the frame; frames 50 and 500: the empty room.
"""

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from infmllm_ros.perception.hog import (  # noqa: E402
    DetectorUnavailableError,
    HogHaarConfig,
    HogHaarDescriber,
)


@pytest.fixture(scope="module")
def describer():
    try:
        return HogHaarDescriber()
    except DetectorUnavailableError as err:
        pytest.fail(f"{err} (the offline describer needs OpenCV's HOG and Haar detectors)")


@pytest.fixture(scope="module")
def campus(clip_frames):
    return clip_frames("vtest.avi", [0, 100, 101, 400])


@pytest.fixture(scope="module")
def room(clip_frames):
    return clip_frames("one-by-one-person-detection.mp4", [50, 300, 500])


def _box_contains(boxes, x, y):
    return any(bx <= x <= bx + bw and by <= y <= by + bh for bx, by, bw, bh in boxes)


def test_people_found_on_campus_frames_where_pedestrians_were_seen(describer, campus):
    describer.reset()
    first = describer.describe(campus[0], "front", 1700000000.0)
    assert first.people >= 2, first.text
    assert _box_contains(first.boxes, 270, 265), f"the standing man at x~270 was missed: {first.boxes}"
    later = describer.describe(campus[400], "front", 1700000040.0)
    assert later.people >= 2, later.text
    assert _box_contains(later.boxes, 288, 245), f"the walker at x~288 was missed: {later.boxes}"
    assert first.people == len(first.boxes) == len(first.people_regions)
    assert "people (" in first.text


def test_close_person_found_and_empty_room_reports_no_people(describer, room):
    describer.reset()
    person = describer.describe(room[300], "room", 0.0)
    assert person.people >= 1, person.text
    assert _box_contains(person.boxes, 384, 216), f"the man in mid-frame was missed: {person.boxes}"
    assert "centre" in person.people_regions
    for index in (50, 500):
        empty = describer.describe(room[index], "room", 0.0)
        assert empty.people == 0, f"frame {index} of the empty room: {empty.text}"
        assert "no people" in empty.text


def test_uniform_synthetic_frames_have_nobody_and_get_colour_and_light_words(describer):
    grey = np.full((480, 640, 3), 128, np.uint8)
    obs = describer.describe(grey, "test", 0.0)
    assert (obs.people, obs.faces, obs.boxes) == (0, 0, [])
    assert obs.colour == "grey" and "mostly grey" in obs.text
    assert "normal light" in obs.text
    dark = describer.describe(np.zeros((480, 640, 3), np.uint8), "test2", 0.0)
    assert dark.people == 0 and "dark" in dark.text and dark.colour == "black"
    red = np.zeros((480, 640, 3), np.uint8)
    red[:, :, 0] = 220
    assert describer.describe(red, "test3", 0.0).colour == "red"
    bright_green = np.zeros((480, 640, 3), np.uint8)
    bright_green[:, :, 1] = 230
    bright_green[:, :, 0] = 190
    obs = describer.describe(bright_green, "test4", 0.0)
    assert obs.colour == "green" and "bright" in obs.text


def test_motion_between_consecutive_frames_with_walkers_but_not_for_a_repeated_frame(describer, campus):
    describer.reset()
    first = describer.describe(campus[100], "front", 10.0)
    assert first.motion == 0.0 and "no motion" in first.text  # nothing to compare with yet
    moved = describer.describe(campus[101], "front", 10.1)
    assert moved.motion >= describer.config.motion_min_fraction, moved.text
    assert moved.motion_region in ("left", "centre", "right", "across")
    assert "no motion" not in moved.text and "motion" in moved.text
    still = describer.describe(campus[101], "front", 10.2)
    assert still.motion == 0.0 and still.motion_region == ""
    assert "no motion" in still.text


def test_motion_state_is_per_camera(describer, campus):
    describer.reset()
    describer.describe(campus[100], "left_cam", 1.0)
    other = describer.describe(campus[101], "right_cam", 1.0)
    assert other.motion == 0.0  # right_cam's first frame: left_cam's frame is not its previous one
    assert describer.describe(campus[101], "left_cam", 1.1).motion > 0.0


def test_text_starts_with_utc_time_and_camera_or_relative_seconds(campus):
    utc = HogHaarDescriber(detect_faces=False)
    line = utc.describe(campus[0], "front", 1700000005.0).text
    assert line.startswith("22:13:25 front: "), line
    relative = HogHaarDescriber(HogHaarConfig(time_format="relative"), detect_faces=False)
    relative.describe(campus[0], "front", 1700000000.0)
    line = relative.describe(campus[0], "front", 1700000002.5).text
    assert line.startswith("t+2.5s front: "), line
    assert "\n" not in line


def test_bad_frames_raise_value_errors_not_crashes(describer):
    with pytest.raises(ValueError):
        describer.describe(np.zeros((0, 10, 3), np.uint8), "x", 0.0)
    with pytest.raises(ValueError):
        describer.describe(np.zeros((10, 10, 2), np.uint8), "x", 0.0)
    tiny = describer.describe(np.zeros((8, 8, 3), np.uint8), "x", 0.0)  # smaller than a HOG window
    assert tiny.people == 0


def test_invalid_config_values_are_refused():
    with pytest.raises(ValueError, match="detect_width"):
        HogHaarConfig(detect_width=10)
    with pytest.raises(ValueError, match="time_format"):
        HogHaarConfig(time_format="local")
    with pytest.raises(ValueError, match="motion"):
        HogHaarConfig(motion_min_fraction=0.5, motion_fraction=0.1)
