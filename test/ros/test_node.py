"""The `infmllm` node over real DDS with the real SmolLM2 engine.

Each test gets a fresh rclpy Context (``ros_context``) in this run's private
domain; the model is loaded once per session (``smollm2`` fixture) and shared
by the nodes. Waits are bounded; nothing asserts on timing.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")

from nodekit import (  # noqa: E402
    Harness,
    clip_frames,
    compressed_msg,
    harness_factory,
    image_msg,
    shared_clip,
    wait_for,
)

pytestmark = [
    pytest.mark.ros,
    pytest.mark.model,
    pytest.mark.usefixtures("interfaces"),
    pytest.mark.skipif(shared_clip() is None, reason="shared/data/video/vtest.avi is missing"),
]

T0 = 1_700_000_000  # stamps of the published frames: T0 + i seconds, + 123456789 ns
NS = 123_456_789


@pytest.fixture(scope="module")
def frames():
    return clip_frames(24, every=10)  # 24 frames spanning ~24 s of the clip, 384x288


@pytest.fixture
def harness(ros_context, smollm2):
    with harness_factory(ros_context, smollm2, **{"diagnostics.period_s": 0.5}) as make:
        yield make


def feed(h, topic, frames, start=0, period=0.0, compressed=False, frame_id="cam_optical",
         sync=True, t0=T0):
    """Publish ``frames`` stamped ``t0 + i`` (+NS). ``sync``: one at a time, each one taken
    in by the worker (encoded or counted bad) before the next, so none is dropped."""
    pub = h.publisher(topic, compressed)
    h.wait_subscribed(topic)
    make = compressed_msg if compressed else image_msg
    for i, f in enumerate(frames, start):
        msg = make(f, t0 + i, NS, frame_id)
        if not sync:
            pub.publish(msg)
            if period:
                time.sleep(period)
            continue
        t = h.node.slots.totals()
        for attempt in range(3):  # best-effort QoS: re-send if the sample was lost
            pub.publish(msg)
            try:
                wait_for(lambda: h.node.slots.totals().received > t.received, 10, "delivery")
                break
            except AssertionError:
                if attempt == 2:
                    raise
        wait_for(lambda: (lambda n: n.encoded + n.bad > t.encoded + t.bad)(h.node.slots.totals()),
                 120, f"frame {i} taken in by the worker")


def fed(h, n):
    return lambda: h.node.slots.totals().encoded >= n


@pytest.fixture(scope="module")
def clip_bag(tmp_path_factory):
    """12 frames of the shared clip (one per second of video, 384 px wide) at 2 fps."""
    from infmllm_ros.ros.video2bag import write_bag

    out = tmp_path_factory.mktemp("bags") / "vtest_bag"
    summary = write_bag(shared_clip(), out, fps=2.0, width=384, every=10, max_frames=12,
                        start_time=T0 + 0.25, frame_id="front_optical")
    assert summary.frames == 12
    return summary


@pytest.mark.slow
def test_replayed_bag_gives_scenes_and_answers_with_its_stamps(harness, clip_bag):
    from infmllm_ros.ros.replay import BagPlayer

    h = harness(**{"cameras.front.topic": "/t/camera/image_raw", "sample_rate_hz": 2.0,
                   "scene.period_s": 2.0, "scene.max_new_tokens": 12})
    h.watch_scenes()
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    sent = []  # the bag's exact stamps and frame ids, as they went over DDS
    h.probe.create_subscription(Image, "/t/camera/image_raw", lambda m: sent.append(
        ((m.header.stamp.sec, m.header.stamp.nanosec), m.header.frame_id)), qos_profile_sensor_data)
    player = BagPlayer(h.probe, clip_bag.path, rate=1.0,
                       remap={clip_bag.topic: "/t/camera/image_raw"})
    assert player.wait_for_subscribers(timeout=20.0)
    player.start()
    assert player.wait(timeout=120.0) and player.error is None
    assert player.published == 12
    wait_for(lambda: h.scenes and h.node.slots.totals().received >= 10
             and not h.node.jobs.busy, 120, "scenes, and the replay taken in")

    bag = {stamp for stamp, _ in sent}
    assert len(bag) >= 10 and {f for _, f in sent} == {"front_optical"}
    for scene in h.scenes:
        st = scene.header.stamp
        assert (st.sec, st.nanosec) in bag  # the newest frame described, exactly
        assert scene.header.frame_id == "front_optical"
        assert scene.newest_frame_stamp == st
        o = scene.oldest_frame_stamp
        assert (o.sec, o.nanosec) in bag and (o.sec, o.nanosec) <= (st.sec, st.nanosec)
        assert scene.camera == "front" and scene.text
        # the ceiling: budget 1024 + room for a chunk (256) and an answer (256)
        assert scene.policy == "infmllm" and scene.cache_budget_tokens == 1024
        assert scene.cache_capacity_tokens == h.node.stream.capacity == 1536
        assert 0 < scene.cache_tokens <= scene.cache_capacity_tokens and scene.cache_bytes > 0
        assert scene.frames_encoded >= 1

    r = h.ask("How many people were visible recently, and where?", max_new_tokens=16)
    assert r.success, r.message
    assert r.answer and r.generated_tokens >= 1 and r.prompt_tokens > 0 and r.latency_s > 0
    o, n = r.oldest_frame_stamp, r.newest_frame_stamp
    assert (o.sec, o.nanosec) in bag and (n.sec, n.nanosec) in bag
    assert clip_bag.first_stamp - 1e-6 <= o.sec + o.nanosec * 1e-9 <= n.sec + n.nanosec * 1e-9 \
        <= clip_bag.last_stamp + 1e-6

    s = h.stats()
    assert s.success and s.policy == "infmllm" and s.frames_encoded >= 2
    # every frame accounted for, in one consistent snapshot (some may still be on their way:
    # in the slot, the describer, or the queue for the model)
    assert s.frames_received == s.frames_encoded + s.frames_dropped + s.frames_bad \
        + s.frames_pending
    assert s.frames_bad == 0 and s.frames_pending <= 2 + h.node.worker.max_ready
    assert s.cache_budget_tokens == 1024 and 0 < s.cache_tokens <= s.cache_capacity_tokens == 1536
    assert s.cache_budget_bytes >= s.cache_bytes > 0
    assert s.tokens_seen >= s.cache_tokens and s.next_position >= s.cache_tokens
    assert (s.newest_frame_stamp.sec, s.newest_frame_stamp.nanosec) in bag
    player.destroy()


def test_exact_stamps_of_every_frame_in_memory(harness, frames):
    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0})
    feed(h, "/t/cam", frames[:4], frame_id="front_optical")
    r = h.ask("How many people were visible?", max_new_tokens=8)
    assert r.success, r.message
    assert (r.oldest_frame_stamp.sec, r.oldest_frame_stamp.nanosec) == (T0, NS)
    assert (r.newest_frame_stamp.sec, r.newest_frame_stamp.nanosec) == (T0 + 3, NS)
    s = h.stats()
    assert (s.frames_received, s.frames_encoded, s.frames_dropped) == (4, 4, 0)


def test_stamps_jumping_back_report_frames_by_stream_order(harness, frames, capfd):
    """A bag looping back to its start, and a second camera on another clock (e.g. since boot):
    Query and GetStats report the frame that arrived last as the newest, per camera when a
    question names one, and the jump back is logged."""
    h = harness(**{"cameras.names": ["front", "rear"], "cameras.front.topic": "/t/front",
                   "cameras.rear.topic": "/t/rear", "sample_rate_hz": 50.0})
    feed(h, "/t/front", frames[:4], start=10)  # T0+10 .. T0+13
    feed(h, "/t/rear", frames[4:6], start=0, t0=1000)  # another clock: 1000, 1001
    feed(h, "/t/front", frames[6:8], start=0)  # the loop: back to T0+0, T0+1
    r = h.ask("What did the front camera see?", camera="front", max_new_tokens=4)
    assert r.success, r.message
    assert (r.oldest_frame_stamp.sec, r.newest_frame_stamp.sec) == (T0 + 10, T0 + 1)
    assert r.newest_frame_stamp.nanosec == NS
    r = h.ask("What did the rear camera see?", camera="rear", max_new_tokens=4)
    assert (r.oldest_frame_stamp.sec, r.newest_frame_stamp.sec) == (1000, 1001)
    s = h.stats()
    assert (s.oldest_frame_stamp.sec, s.newest_frame_stamp.sec) == (T0 + 10, T0 + 1)
    feed(h, "/t/rear", frames[8:9], start=2, t0=1000)
    assert h.stats().newest_frame_stamp.sec == 1002  # the rear camera's clock is behind, but it is newest
    err = capfd.readouterr().err
    assert "camera 'front': image stamp jumped back 13.000 s" in err, err[-2000:]
    assert "camera 'rear': image stamp jumped back" not in err


def test_frames_are_dropped_not_queued_when_the_model_is_slower(harness, frames):
    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 0.5})
    h.watch_diagnostics()
    feed(h, "/t/cam", frames[:20], period=0.02, sync=False)  # 50 Hz against a 0.5 Hz sampler
    wait_for(lambda: h.node.slots.totals().received >= 15, 30, "frames received")
    time.sleep(0.5)
    s = h.stats()
    assert s.frames_dropped >= 10  # overwritten in the slot, never queued
    assert s.frames_encoded <= 3
    assert s.frames_received >= s.frames_dropped + s.frames_encoded
    wait_for(lambda: any(int(_kv(st, "dropped") or 0) >= 10 for a in h.diagnostics
                         for st in a.status if st.name.endswith("camera front")),
             30, "diagnostics reporting the dropped frames")


def _kv(status, key):
    return next((v.value for v in status.values if v.key == key), None)


def test_two_cameras_one_compressed(harness, frames):
    h = harness(**{"cameras.names": ["front", "rear"],
                   "cameras.front.topic": "/t/front/image_raw",
                   "cameras.rear.topic": "/t/rear/image_raw/compressed",
                   "cameras.rear.transport": "compressed",
                   "cameras.rear.frame_id": "rear_override",
                   "sample_rate_hz": 50.0})
    feed(h, "/t/front/image_raw", frames[:2])
    feed(h, "/t/rear/image_raw/compressed", frames[2:4], start=2, compressed=True)
    wait_for(lambda: all(c.encoded >= 2 for c in h.node.slots.counts().values()), 120,
             "2 frames encoded from each camera")
    assert h.node.worker.stats.cameras == {"front": 2, "rear": 2}
    r = h.ask("What did the rear camera see?", camera="rear", max_new_tokens=8)
    assert r.success, r.message
    # the rear camera's own frames: stamps T0+2, T0+3
    assert r.newest_frame_stamp.sec == T0 + 3
    assert h.node.worker.book.lookup(T0 + 3 + NS * 1e-9).frame_id == "rear_override"
    r = h.ask("What did the side camera see?", camera="side")
    assert not r.success and "unknown camera 'side'" in r.message


def test_bad_images_are_counted_and_the_node_keeps_running(harness, frames):
    from sensor_msgs.msg import Image

    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0})
    h.watch_diagnostics()
    pub = h.publisher("/t/cam")
    h.wait_subscribed("/t/cam")
    bad = [
        Image(height=10, width=10, encoding="rgb8", step=30, data=b"\x00" * 7),  # too short
        Image(height=4, width=4, encoding="no_such_encoding", step=12, data=b"\x00" * 48),
        Image(height=0, width=0, encoding="rgb8", step=0, data=b""),
    ]
    for m in bad:
        m.header.stamp.sec = T0
        pub.publish(m)
        time.sleep(0.3)
    wait_for(lambda: h.node.slots.totals().bad >= 3, 60, "3 bad frames counted")
    pub.publish(image_msg(frames[0], T0 + 1, NS))
    wait_for(fed(h, 1), 60, "a good frame encoded after the bad ones")
    assert h.node.worker.alive
    assert h.stats().success
    wait_for(lambda: any(_kv(st, "bad") == "3" for a in h.diagnostics for st in a.status), 30,
             "diagnostics reporting 3 bad frames")


def test_questions_are_checked_before_the_model(harness, frames):
    h = harness(**{"cameras.front.topic": "/t/cam", "query.max_question_chars": 50,
                   "cache.budget_tokens": 256, "cache.max_chunk_tokens": 128})
    r = h.ask("How many people?")
    assert not r.success and "no camera frames in memory yet" in r.message
    r = h.ask("   ")
    assert not r.success and "empty question" in r.message
    r = h.ask("x" * 51)
    assert not r.success and "question too long" in r.message and "50" in r.message
    # under the character limit, but too many tokens for the cache: refused at once, in tokens
    r = h.ask("\U0001F600" * 50)
    assert not r.success and "question too long" in r.message and "tokens" in r.message, r.message
    assert "fit" in r.message and h.node.jobs.pending() == 0
    r = h.ask("Where?", camera="back")
    assert not r.success and "unknown camera 'back'" in r.message


def test_concurrent_questions_queue_or_reject(harness, frames):
    from infmllm_ros.srv import Query

    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0,
                   "query.busy_policy": "reject", "query.timeout_s": 900.0})
    feed(h, "/t/cam", frames[:2])

    def burst(n, tokens=6):
        """n questions sent at once (they reach the node within milliseconds)."""
        futs = [h.call_async(Query, "query", question=f"Question {i}: what did you see?",
                             max_new_tokens=tokens) for i in range(n)]
        return [h.result(f, 900) for f in futs]

    res = burst(3)
    ok = [r for r in res if r.success]
    refused = [r for r in res if not r.success]
    assert ok, [r.message for r in res]
    assert refused and all("busy" in r.message and "reject" in r.message for r in refused)
    first_refused = len(refused)

    h.set_params(query__busy_policy="queue", query__queue_size=4)
    res = burst(3)
    assert all(r.success for r in res), [r.message for r in res]
    assert h.node.worker.latency.count == len(ok) + 3

    h.set_params(query__queue_size=1)
    res = burst(3)  # one answered now, at most one waiting, the rest refused
    refused = [r for r in res if not r.success]
    assert refused and all("queue_size is 1" in r.message for r in refused), \
        [r.message for r in res]
    assert any(r.success for r in res)
    assert h.node.jobs.refused == first_refused + len(refused)


def test_reset_forgets_the_stream(harness, frames):
    from std_srvs.srv import Trigger

    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0})
    feed(h, "/t/cam", frames[:3])
    wait_for(fed(h, 3), 120, "frames encoded")
    before = h.stats()
    assert before.cache_tokens > 0
    tracker = h.node.encoder.describer.tracker
    assert tracker.active("front") > 0  # the clip's pedestrians are being tracked
    r = h.call(Trigger, "reset", timeout=60)
    assert r.success and "cache cleared" in r.message
    # the tracks go with the memory: no line after the reset refers to a track from before it
    assert tracker.active("front") == 0 and h.node.encoder.last_observation is None
    after = h.stats()
    assert (after.cache_tokens, after.frames_encoded, after.tokens_seen) == (0, 0, 0)
    assert after.newest_frame_stamp.sec == 0
    r = h.ask("What happened?")
    assert not r.success and "no camera frames" in r.message
    # more answer tokens than the cache keeps room for: accepted, and the reply will say so
    # (queued while the memory is empty: the worker refuses them, no answer is generated)
    job, reason = h.node._submit_question("What happened?", "", 10**6)
    assert reason is None and job.args["max_new_tokens"] == h.node.max_answer_tokens
    assert f"limited to {h.node.max_answer_tokens}" in job.note
    job.cancel()
    job, _ = h.node._submit_question("What happened?", "", 8)
    assert job.note == ""
    job.cancel()
    feed(h, "/t/cam", frames[3:4], start=3)
    wait_for(fed(h, 1), 60, "a frame encoded after the reset")
    obs = h.node.encoder.last_observation
    assert obs.events and {e.kind for e in obs.events} == {"appeared"}, obs.text
    assert min(e.track_id for e in obs.events) == 1
    r = h.ask("What happened?", max_new_tokens=8)
    assert r.success and r.oldest_frame_stamp.sec == T0 + 3  # nothing from before the reset


def test_ask_action_streams_partial_answers_and_cancels(harness, frames, ros_context):
    from action_msgs.msg import GoalStatus
    from rclpy.action import ActionClient

    from infmllm_ros.action import Ask

    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0})
    feed(h, "/t/cam", frames[:2])
    wait_for(fed(h, 2), 120, "frames encoded")
    client = ActionClient(h.probe, Ask, f"{h.fqn}/ask")
    assert client.wait_for_server(timeout_sec=20)

    feedback = []
    goal = Ask.Goal(question="Describe everything you saw.", max_new_tokens=16)
    gh = Harness.result(client.send_goal_async(goal, feedback_callback=feedback.append), 30)
    assert gh.accepted
    res = Harness.result(gh.get_result_async(), 180)
    assert res.status == GoalStatus.STATUS_SUCCEEDED and res.result.success
    assert feedback and res.result.answer.startswith(feedback[-1].feedback.partial_text.strip()[:5])

    feedback.clear()
    goal = Ask.Goal(question="Describe everything you saw, in great detail.", max_new_tokens=200)
    gh = Harness.result(client.send_goal_async(goal, feedback_callback=feedback.append), 30)
    wait_for(lambda: feedback, 120, "a first partial answer")
    Harness.result(gh.cancel_goal_async(), 30)
    res = Harness.result(gh.get_result_async(), 120)
    assert res.status == GoalStatus.STATUS_CANCELED
    assert res.result.generated_tokens < 200 and not res.result.success

    bad = Harness.result(client.send_goal_async(Ask.Goal(question="")), 30)
    assert not bad.accepted
    client.destroy()


def test_bad_parameters_stop_the_node_with_a_reason(ros_context, smollm2):
    from rclpy.parameter import Parameter

    from infmllm_ros.ros.node import InfMllmNode
    from infmllm_ros.ros.params import ParameterError

    with pytest.raises(ParameterError, match="cache.policy must be one of"):
        InfMllmNode(loaded_model=smollm2, context=ros_context,
                    parameter_overrides=[Parameter("cache.policy", value="lru")])
    with pytest.raises(ParameterError, match="budget"):  # the engine's own check
        InfMllmNode(loaded_model=smollm2, context=ros_context,
                    parameter_overrides=[Parameter("cache.budget_tokens", value=40)])


def _camera_status(h, name="front"):
    """The newest /diagnostics status of camera ``name`` (None before the first)."""
    for arr in reversed(list(h.diagnostics)):
        for st in arr.status:
            if st.name.endswith(f"camera {name}"):
                return st
    return None


def test_a_silent_camera_goes_stale_then_dead_and_recovers(harness, frames):
    """WARN after diagnostics.stale_periods sample periods without an image, ERROR after
    diagnostics.dead_periods, OK again as soon as images come back."""
    from diagnostic_msgs.msg import DiagnosticStatus

    h = harness(**{"cameras.front.topic": "/t/cam", "sample_rate_hz": 5.0,
                   "diagnostics.period_s": 0.2, "diagnostics.stale_periods": 5.0,
                   "diagnostics.dead_periods": 15.0})  # 1 s stale, 3 s dead
    h.watch_diagnostics()
    pub = h.publisher("/t/cam")
    h.wait_subscribed("/t/cam")
    sent = [0]

    def level_is(level, words="", streaming=False):
        def check():
            if streaming:  # a live camera: a new image every poll
                pub.publish(image_msg(frames[sent[0] % 4], T0 + sent[0], NS))
                sent[0] += 1
            st = _camera_status(h)
            return st is not None and st.level == level and words in st.message
        return check

    wait_for(level_is(DiagnosticStatus.WARN, "no images received"), 30, "WARN before any image")
    wait_for(level_is(DiagnosticStatus.OK, "receiving", streaming=True), 60, "OK while images arrive",
             step=0.1)
    wait_for(level_is(DiagnosticStatus.WARN, "stale"), 30, "WARN once the camera is silent")
    wait_for(level_is(DiagnosticStatus.ERROR, "dead"), 30, "ERROR after a longer silence")
    assert float(_kv(_camera_status(h), "seconds_since_last_image")) > 3.0
    wait_for(level_is(DiagnosticStatus.OK, "receiving", streaming=True), 60,
             "OK again once images come back", step=0.1)


def test_memory_survives_a_restart_through_the_state_file(harness, frames, tmp_path):
    """memory.state_file: periodic and on-demand atomic saves, a save at shutdown, the memory
    back after a restart (same cache, exact stamps), and a file that does not match (or is
    not a state at all) moved aside with the node starting fresh."""
    from std_srvs.srv import Trigger

    path = tmp_path / "memory.pt"
    params = {"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0,
              "memory.state_file": str(path), "memory.save_period_s": 0.5}
    a = harness(**params)
    feed(a, "/t/cam", frames[:3])
    wait_for(path.is_file, 60, "a periodic save")
    saved = a.call(Trigger, "save", timeout=120)
    assert saved.success and f"to {path}" in saved.message, saved.message
    feed(a, "/t/cam", frames[3:4], start=3)  # after the last save: kept by the shutdown save
    before = a.stats()
    assert (before.newest_frame_stamp.sec, before.frames_encoded) == (T0 + 3, 4)
    a.close()
    size = path.stat().st_size
    assert size <= 1.1 * before.cache_bytes + 256 * 1024  # the cache and its records, no more

    b = harness(**params)
    after = b.stats()
    assert after.cache_tokens == before.cache_tokens > 0 and after.tokens_seen == before.tokens_seen
    assert (after.oldest_frame_stamp.sec, after.oldest_frame_stamp.nanosec) == (T0, NS)  # exact
    assert (after.newest_frame_stamp.sec, after.newest_frame_stamp.nanosec) == (T0 + 3, NS)
    r = b.ask("How many people were visible?", max_new_tokens=4)  # no new frame needed
    assert r.success and r.newest_frame_stamp.sec == T0 + 3, r.message
    loaded = b.call(Trigger, "load", timeout=120)
    assert loaded.success and "restored" in loaded.message, loaded.message
    b.close()

    other = harness(**{**params, "cache.budget_tokens": 512})  # other settings: start fresh
    assert other.stats().cache_tokens == 0
    aside = list(tmp_path.glob("memory.pt.rejected-*"))
    assert [p.name for p in aside if not p.name.endswith(".json")] and not path.exists()
    refused = other.call(Trigger, "load", timeout=120)
    assert not refused.success and "no state file" in refused.message
    other.close()

    path.write_bytes(b"not a torch file at all")
    garbage = harness(**params)
    assert garbage.stats().cache_tokens == 0
    assert len([p for p in tmp_path.glob("memory.pt.rejected-*") if not p.name.endswith(".json")]) == 2
    garbage.close()

    off = harness(**{"cameras.front.topic": "/t/cam"})
    r = off.call(Trigger, "save", timeout=60)
    assert not r.success and "memory.state_file is not set" in r.message
