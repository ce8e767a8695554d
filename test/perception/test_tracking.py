"""Tracks, ids and events over real segments of the shared clips at the node's default 1 frame/s.

Checked by eye (frames enlarged, positions in the frame's pixels):

* vtest.avi, one frame a second from 0 to 310: a man in black walks in from the right edge and
  crosses the path right to left, his box centre at ~(682, 325) (frame 240), ~(551, 291) (260),
  ~(369, 263) (290), on a smooth line through the detections in between; the white van (YOLO: truck) and a light blue car
  are parked at the top right the whole time.
* one-by-one-person-detection.mp4, one frame a second from 240 to 510: a man in a black jacket walks
  in from the bottom left (frame ~230, cut by the frame; found from 240), stands at the table in
  the middle from 250, walks off to the right at ~440 (mid-stride, not detected) and the room is
  empty from 450.
"""

from __future__ import annotations

import pytest

pytest.importorskip("cv2")
pytest.importorskip("supervision", reason="supervision (ByteTrack) is not installed")

from infmllm_ros.perception.describer import DescriberConfig, FrameDescriber  # noqa: E402
from infmllm_ros.perception.tracking import ObjectTracker, TrackerConfig, TrackEvent  # noqa: E402

CAMPUS = "vtest.avi"
ROOM = "one-by-one-person-detection.mp4"
T0 = 1_700_000_000.0
#: Frame -> box centre of the man crossing vtest.avi right to left (240, 260, 290 by eye).
CROSSER = {240: (682, 325), 250: (618, 305), 260: (551, 291), 270: (477, 285), 290: (369, 263),
           300: (329, 250), 310: (286, 238)}


@pytest.fixture(scope="module")
def campus(detector, clip_frames):
    """vtest.avi at 1 frame/s, frames 0..310, described from a fresh describer."""
    indices = list(range(0, 311, 10))
    frames = clip_frames(CAMPUS, indices)
    describer = FrameDescriber(detector=detector)
    return {i: describer.describe(frames[i], "front", T0 + i / 10) for i in indices}


@pytest.fixture(scope="module")
def room(detector, clip_frames):
    indices = list(range(240, 511, 10))
    frames = clip_frames(ROOM, indices)
    describer = FrameDescriber(DescriberConfig(time_format="relative"), detector=detector)
    return {i: describer.describe(frames[i], "room", T0 + i / 10) for i in indices}, frames


def _crosser_ids(observations) -> dict[int, int]:
    ids = {}
    for index, (x, y) in CROSSER.items():
        near = [o for o in observations[index].objects if o.label == "person"
                and abs(o.box[0] + o.box[2] / 2 - x) < 30 and abs(o.box[1] + o.box[3] / 2 - y) < 30]
        assert len(near) == 1, (index, near)
        ids[index] = near[0].track_id
    return ids


def test_a_person_crossing_keeps_one_id_and_gives_a_crossed_event(campus):
    ids = _crosser_ids(campus)
    assert len(set(ids.values())) == 1 and 0 not in ids.values(), ids
    who = ids[240]
    crossed = [e for o in campus.values() for e in o.events if e.kind == "crossed" and e.track_id == who]
    assert crossed == [TrackEvent("crossed", "person", who, "centre", direction="right to left")]
    assert f"person {who} crossed right to left" in campus[310].text


def test_parked_vehicles_are_counted_every_frame_and_stay(campus):
    for index, obs in campus.items():
        assert obs.counts.get("truck") == 1 and "1 white truck (right)" in obs.text, obs.text
        assert obs.counts.get("car") == 1, obs.text
    stayed = {(e.label, e.track_id, e.seconds) for e in campus[300].events if e.kind == "stayed"}
    assert stayed == {("truck", 1, 30.0), ("car", 1, 30.0)}
    assert "truck 1 stayed 30 s" in campus[300].text
    first = campus[0]  # a camera's first frame: everything appears at once
    assert {(e.kind, e.label) for e in first.events} >= {("appeared", "truck"), ("appeared", "car")}


def test_plain_bytetrack_loses_the_crossing_person_at_1_hz(detector, clip_frames):
    """Why the buffered IoU: without it the same walk breaks into pieces (most samples untracked)."""
    indices = list(range(0, 311, 10))
    frames = clip_frames(CAMPUS, indices)
    plain = FrameDescriber(DescriberConfig(tracker=TrackerConfig(match_buffer=0.0)), detector=detector)
    observations = {i: plain.describe(frames[i], "front", T0 + i / 10) for i in indices}
    ids = _crosser_ids(observations)
    assert len(set(ids.values()) - {0}) != 1 or 0 in ids.values(), ids


def test_room_lines_match_what_was_seen(room):
    observations, _ = room
    texts = {i: o.text for i, o in observations.items()}
    for i in range(240, 431, 10):  # the man walking in, then at the table
        assert observations[i].counts == {"person": 1}, texts[i]
        assert observations[i].objects[0].region == "centre" and observations[i].objects[0].track_id == 1
        assert "1 person in black (centre)" in texts[i]
    for i in range(470, 511, 10):  # the empty room
        assert observations[i].objects == [] and "nothing detected" in texts[i], texts[i]
    events = {i: [e.phrase for e in o.events] for i, o in observations.items() if o.events}
    assert events == {240: ["person 1 appeared centre"], 470: ["person 1 left after 19 s"]}
    assert texts[240] == "t+0.0s room: 1 person in black (centre); person 1 appeared centre"
    assert texts[250] == "t+1.0s room: 1 person in black (centre)"
    assert texts[470] == "t+23.0s room: nothing detected; person 1 left after 19 s"


def test_same_frames_give_the_same_lines(room, detector):
    observations, frames = room
    again = FrameDescriber(DescriberConfig(time_format="relative"), detector=detector)
    for i in sorted(frames):
        assert again.describe(frames[i], "room", T0 + i / 10).text == observations[i].text


def test_tracks_are_per_camera_and_restart_when_time_goes_back(detector, clip_frames):
    frames = clip_frames(ROOM, [250, 260])
    d = FrameDescriber(DescriberConfig(time_format="none"), detector=detector)
    assert d.describe(frames[250], "a", 10.0).events[0].phrase == "person 1 appeared centre"
    assert d.describe(frames[250], "b", 10.0).events[0].phrase == "person 1 appeared centre"
    assert d.describe(frames[260], "a", 11.0).events == []
    back = d.describe(frames[260], "a", 5.0)  # a looping bag: the camera's tracks restart
    assert [e.phrase for e in back.events] == ["person 1 appeared centre"]


def test_left_and_stayed_follow_stamps_not_frame_counts():
    from infmllm_ros.perception.detector import Detection

    tracker = ObjectTracker(TrackerConfig(lost_s=3.0, stay_milestones_s=(30, 60)))
    person = [Detection("person", 0, 0.9, (100, 100, 40, 100))]
    ids, events = tracker.update("c", person, 0.0, 640)
    assert ids == [1] and [e.phrase for e in events] == ["person 1 appeared left"]
    for t in range(1, 61):
        ids, events = tracker.update("c", person, float(t), 640)
        assert ids == [1]
        if t in (30, 60):
            assert [e.phrase for e in events] == [f"person 1 stayed {t if t < 60 else '60'} s"]
        else:
            assert events == []
    assert tracker.update("c", [], 63.0, 640)[1] == []  # unseen 3 s: not gone yet
    ids, events = tracker.update("c", [], 63.5, 640)
    assert [e.phrase for e in events] == ["person 1 left after 60 s"] and tracker.active("c") == 0


def test_tracker_settings_are_checked():
    for bad in (dict(lost_s=0), dict(match_buffer=-1), dict(frame_rate=0), dict(cross_margin=0.5),
                dict(stay_milestones_s=(60, 30))):
        with pytest.raises(ValueError):
            TrackerConfig(**bad)
