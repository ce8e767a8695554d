"""Scene-memory QA without the model: ground truth from the lines, questions per lag bucket, intervals, the cache.

The stream and question checks use the real describer's cached lines of the
shared clips (described on first use, about a minute per clip, then read back).
"""

from __future__ import annotations

import json
import re

import pytest

from infmllm_ros.bench import sceneqa
from infmllm_ros.bench.common import clip_observations, load_config, wilson
from infmllm_ros.perception.describer import FrameDescriber

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sceneqa")
    return load_config("sceneqa", {"out": str(out), "minutes": 6, "clip_frames": 20, "questions": 60,
                                   "lag_buckets": [1, 10, 60, 300]}, quick=False)


@pytest.fixture(scope="module")
def lines(cfg):
    return sceneqa.build_lines(cfg)[0]


def _person_phrase(objects: str) -> str:
    """The people part of a line's object list (``'4 people: 3 in black (centre, 2 right) and 1 in blue
    (left)'``), or '' when the line names no person."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(objects):  # split at the top-level ", " (regions in parentheses have commas too)
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and objects.startswith(", ", i):
            pieces.append(objects[start:i])
            start = i + 2
    pieces.append(objects[start:])
    phrase = ""
    for piece in pieces:
        if re.match(r"\d+ (people|person)\b", piece):
            phrase = piece
        elif phrase and re.match(r"\d+ in ", piece):  # a further colour group of the people
            phrase += ", " + piece
        elif phrase:
            break
    return phrase


def test_every_fact_is_what_its_line_says(lines):
    for line in lines:
        text, facts = line.text.rstrip("\n"), line.facts
        head, _, body = text.partition(": ")
        when_camera, _, light = head.partition(" (")
        assert when_camera == f"{sceneqa.clock(line.stamp)} {line.camera}"
        assert facts["light"] == (light.rstrip(")").split()[0] if light else "normal"), text
        phrase = _person_phrase(body.partition("; ")[0])
        count = re.match(r"(\d+) (people|person)\b", phrase)
        assert (count.group(1) if count else "no") == facts["people"], text
        regions = set(re.findall(r"\b(left|centre|right)\b", phrase))
        for region in ("left", "right", "centre"):
            assert facts[f"anyone:{region}"] == ("yes" if region in regions else "no"), text
        assert facts["colour"], text


def test_event_cameras_fire_now_and_then_and_stamps_advance_in_real_time(cfg, lines):
    steady = [n.split("=")[0] for n in cfg.cameras]
    events = [n.split("=")[0] for n in cfg.event_cameras]
    samples = int(cfg.minutes * 60 * cfg.fps)
    for name in steady:
        assert [ln.sample for ln in lines if ln.camera == name] == list(range(samples))
    low, high = cfg.event_interval_s
    for name in events:
        fired = [ln.sample for ln in lines if ln.camera == name]
        assert fired, name
        assert all(low <= b - a <= high + 1 for a, b in zip(fired, fired[1:])), (name, fired)
    assert all(ln.stamp == sceneqa.T0 + ln.sample / cfg.fps for ln in lines)
    # a looped clip: the line of sample k is the clip's frame k mod clip length, with the new stamp
    assert lines[0].text.split(": ", 1)[1] == next(
        ln for ln in lines if ln.camera == lines[0].camera and ln.sample == cfg.clip_frames).text.split(": ", 1)[1]


def test_questions_are_spread_evenly_over_lags_and_ask_about_the_newest_line(cfg, lines):
    questions = sceneqa.make_questions(cfg, lines)
    edges = cfg.lag_buckets
    per_bucket = {b: sum(q.bucket == b for q in questions) for b in range(len(edges) - 1)}
    assert len(set(per_bucket.values())) == 1 and sum(per_bucket.values()) >= cfg.questions
    by_index = {ln.index: ln for ln in lines}
    events = {n.split("=")[0] for n in cfg.event_cameras}
    for q in questions:
        target, asked_at = by_index[q.target], by_index[q.after]
        assert edges[q.bucket] <= q.lag_s < edges[q.bucket + 1]
        assert q.lag_s == asked_at.sample - target.sample and target.camera in events
        newer = [ln for ln in lines if ln.camera == target.camera and target.sample < ln.sample <= asked_at.sample]
        assert not newer  # the camera's newest line when the question comes
        assert q.right == target.facts["people"] and q.right in q.candidates
        assert sceneqa.clock(target.stamp) in q.text and q.cue == target.text.partition(": ")[0] + ": "
        assert q.cue.startswith(f"{sceneqa.clock(target.stamp)} {q.camera}")
        # the cue leads to the answer: the line goes on with the count, or "nothing" for zero people
        # (a line led by other objects, "1 cyan car ...", is not asked about with this cue)
        said = target.text[len(q.cue):].split(" ", 1)[0]
        assert said == sceneqa.LINE_WORDS.get(q.right, q.right), (target.text, q.right)
    assert [q.after for q in questions] == sorted(q.after for q in questions)
    again = sceneqa.make_questions(cfg, lines)  # seeded: the same questions for every policy and every run
    assert [(q.after, q.target, q.right) for q in again] == [(q.after, q.target, q.right) for q in questions]


def test_no_memory_baseline_is_the_most_frequent_answer(lines):
    prior = sceneqa.prior_answers(lines)
    hall = [ln.facts["people"] for ln in lines if ln.camera == "hall"]
    assert prior[("hall", "people")] == max(set(hall), key=hall.count)


def test_free_form_answers_are_read_by_the_first_candidate_they_name():
    people = sceneqa.QUESTION_TYPES["people"].candidates
    yes_no = sceneqa.QUESTION_TYPES["anyone_left"].candidates
    # the node's own answer style, which the first-word rule read as wrong whatever the count
    assert sceneqa.free_form_answer("The camera saw 5 people and 1 cyan car (right).", people) == "5"
    assert sceneqa.free_form_answer("5 people in black (left, 4 right)", people) == "5"  # after the line cue
    assert sceneqa.free_form_answer("Five people, then two.", people) == "5"
    assert sceneqa.free_form_answer("Nothing detected", people) == "no"
    assert sceneqa.free_form_answer("Nobody.", people) == "no"
    assert sceneqa.free_form_answer("No, the left was empty.", yes_no) == "no"
    assert sceneqa.free_form_answer("Yes: person 3 was there.", yes_no) == "yes"
    # words are whole, and a count is not a yes/no answer
    assert sceneqa.free_form_answer("I do not know.", yes_no) is None
    assert sceneqa.free_form_answer("I have no record of 22:15:03.", people) is None  # a refusal is no answer
    assert sceneqa.free_form_answer("There were no cars but 3 people.", people) == "3"
    assert sceneqa.free_form_answer("There was no one on the left.", yes_no) == "no"
    assert sceneqa.free_form_answer("The camera saw 0 people.", people) == "no"
    assert sceneqa.free_form_answer("There were 2 people.", yes_no) is None
    assert sceneqa.free_form_answer("", people) is None


def test_wilson_interval():
    low, high = wilson(30, 100)
    assert low == pytest.approx(0.2189, abs=1e-3) and high == pytest.approx(0.3958, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(300, 300)
    assert high == pytest.approx(1.0) and 0.98 < low < 1.0


def test_described_clips_are_cached_by_describer_version(cfg, lines):
    fingerprint = FrameDescriber().fingerprint()
    cached = list(__import__("pathlib").Path(cfg.out).glob(f"describe_*_{fingerprint}.json"))
    assert len(cached) == 2  # one per clip, whatever the number of cameras replaying it
    data = json.loads(cached[0].read_text())
    assert data["fingerprint"] == fingerprint and len(data["observations"]) == cfg.clip_frames
    observations, _ = clip_observations(data["video"], cfg.fps, "porch", cfg.out, cfg.clip_frames)
    assert [o.people for o in observations] == [o["counts"].get("person", 0) for o in data["observations"]]
    assert {o.camera for o in observations} == {"porch"}


def test_bad_settings_are_refused(cfg):
    with pytest.raises(ValueError, match="lag_buckets"):
        load_config("sceneqa", {"lag_buckets": [10, 5]}, quick=False)
    with pytest.raises(ValueError, match="name=video"):
        sceneqa.parse_cameras(["front"])
    with pytest.raises(ValueError, match="unknown question types"):
        sceneqa.make_questions(load_config("sceneqa", {**_fields(cfg), "question_types": ["nope"]}, quick=False),
                               [])


def _fields(cfg):
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k not in ("command", "quick")}
