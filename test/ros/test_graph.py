"""The node as a ROS graph citizen: names, namespaces, clocks, QoS, frames lost in transport.

Real nodes over real DDS with the real SmolLM2 (loaded once per session and
shared); replays run as real ``infmllm-replay`` processes. Waits are bounded;
nothing asserts on timing.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")

from nodekit import STREAM_YAML, Harness, clip_frames, image_msg, node_test_marks, shared_clip, wait_for  # noqa: E402

pytestmark = node_test_marks()

T0 = 1_700_000_000


@pytest.fixture
def nodes(ros_context, smollm2):
    made = []

    def make(name="infmllm", namespace="/t", cli_args=None, **params):
        params.setdefault("diagnostics.period_s", 0.3)
        h = Harness(ros_context, smollm2, params=params, cli_args=cli_args, name=name,
                    namespace=namespace)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _status(h, suffix):
    """The newest DiagnosticStatus of ``h``'s node whose name ends with ``suffix``."""
    for arr in reversed(h.diagnostics):
        for s in arr.status:
            if s.name == f"{h.fqn}: {suffix}":
                return s
    return None


def _kv(status, key):
    return next((v.value for v in status.values if v.key == key), None) if status else None


def test_renamed_node_keeps_the_shipped_params_file_and_warns_about_one_it_cannot_use(
        nodes, tmp_path, capfd):
    """node_name:=watcher with config/stream.yaml: the preset, the camera and the scene period
    still apply (the file is keyed /**). A params file keyed for another node name gets a
    warning that names its sections instead of being dropped silently."""
    h = nodes(name="watcher", namespace="/", cli_args=["--ros-args", "--params-file", str(STREAM_YAML)])
    s = h.node.settings
    assert s.model.preset == "smollm2-offline" and s.scene.period_s == 20.0
    assert s.camera("front").topic == "camera/image_raw"
    assert h.node._topics["front"] == "/camera/image_raw"

    other = tmp_path / "other.yaml"
    other.write_text("/**/infmllm:\n  ros__parameters:\n    sample_rate_hz: 7.0\n")
    capfd.readouterr()
    h2 = nodes(name="watcher2", namespace="/", cli_args=["--ros-args", "--params-file", str(other)])
    err = capfd.readouterr().err
    assert h2.node.settings.sample_rate_hz == 1.0  # rcl applied nothing from it ...
    assert f"params file {other} has no section for this node (/watcher2" in err  # ... and we say so
    assert "/**/infmllm" in err


@pytest.mark.slow
def test_two_namespaced_nodes_each_answer_only_about_their_own_camera(nodes, tmp_path):
    """Two nodes from the same params file in /r1 and /r2, each fed by its own
    `infmllm-replay --ros-args -r __ns:=/rN` of a different bag (the bags' topic is the same
    absolute /camera/image_raw): each node receives only its own bag and answers with its own
    frames' stamps; their diagnostics are told apart by the fully qualified name."""
    from infmllm_ros.ros.video2bag import write_bag

    starts = {"/r1": T0, "/r2": T0 + 10_000}
    bags = {ns: write_bag(shared_clip(), tmp_path / ns.strip("/"), fps=2.0, width=192,
                          every=10, max_frames=4, start_time=t, skip=40 * i).path
            for i, (ns, t) in enumerate(starts.items())}
    hs = {ns: nodes(namespace=ns, cli_args=["--ros-args", "--params-file", str(STREAM_YAML)],
                    sample_rate_hz=50.0) for ns in starts}
    for h in hs.values():
        h.watch_diagnostics()
    replays = [subprocess.Popen(
        [sys.executable, "-m", "infmllm_ros.ros.replay", str(bags[ns]), "--rate", "2",
         "--qos", "reliable", "--wait-timeout", "60", "--ros-args", "-r", f"__ns:={ns}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
        for ns in starts]
    try:
        outs = [p.communicate(timeout=120)[0] for p in replays]
    finally:
        for p in replays:
            p.kill() if p.poll() is None else None
    for ns, out in zip(starts, outs):
        assert f"{ns}/camera/image_raw" in out, out
    for ns, h in hs.items():
        assert h.node._topics["front"] == f"{ns}/camera/image_raw"
        wait_for(lambda h=h: h.node.slots.totals().encoded + h.node.slots.totals().dropped >= 4,
                 120, f"{ns}'s frames taken in")
        assert h.node.slots.totals().received == 4  # its own 4, never the other's
        wait_for(lambda h=h: not h.node.jobs.busy and h.node.slots.totals().encoded >= 1, 60, "idle")
        r = h.ask("How many people did you see?", max_new_tokens=6)
        assert r.success, r.message
        lo, hi = starts[ns], starts[ns] + 2
        assert lo <= r.oldest_frame_stamp.sec <= r.newest_frame_stamp.sec <= hi, (ns, r)
        wait_for(lambda h=h: _status(h, "camera front") is not None, 30, "diagnostics")
        assert _kv(_status(h, "camera front"), "topic") == f"{ns}/camera/image_raw"
        assert _kv(_status(h, "camera front"), "received") == "4"


def test_diagnostics_keep_coming_and_say_why_with_sim_time_and_a_stale_clock(nodes):
    """use_sim_time with no /clock: /diagnostics still arrive (steady-clock timer) with a WARN
    saying no /clock has arrived; /clock published: the warning goes; /clock stopped: a WARN
    that it has not advanced."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock

    h = nodes(namespace="/sim", use_sim_time=True)
    h.watch_diagnostics()
    wait_for(lambda: len(h.diagnostics) >= 2, 30, "diagnostics with use_sim_time and no /clock")
    clock = _status(h, "clock")
    assert clock is not None and clock.level == DiagnosticStatus.WARN and "no /clock message" in clock.message

    pub = h.probe.create_publisher(Clock, "/clock", QoSProfile(
        depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    t = [T0]

    def tick() -> bool:
        t[0] += 1
        m = Clock()
        m.clock.sec = t[0]
        pub.publish(m)
        n = len(h.diagnostics)
        time.sleep(0.35)
        return len(h.diagnostics) > n and _status_in(h.diagnostics[-1], h, "clock") is None

    wait_for(tick, 30, "the clock warning gone while /clock advances", step=0.0)
    n = len(h.diagnostics)
    wait_for(lambda: len(h.diagnostics) > n and "has not advanced" in (
        getattr(_status_in(h.diagnostics[-1], h, "clock"), "message", "")), 30,
        "a warning once /clock stops")


def _status_in(arr, h, suffix):
    return next((s for s in arr.status if s.name == f"{h.fqn}: {suffix}"), None)


def test_frames_lost_in_transport_are_estimated_from_gaps_in_the_stamps(nodes):
    """A 5 Hz camera whose frames 3, 4, 9 and 15-17 never arrive (as DDS drops large frames on a
    busy machine, before any callback): /diagnostics shows frames_lost_estimate 6 and the
    camera's own rate, 5 Hz, while received stays what arrived."""
    h = nodes(namespace="/loss", **{"cameras.front.topic": "cam", "sample_rate_hz": 0.5})
    h.watch_diagnostics()
    frame = clip_frames(1, width=64)[0]
    pub = h.publisher("/loss/cam")
    h.wait_subscribed("/loss/cam")
    missing = {3, 4, 9, 15, 16, 17}
    sent = 0
    for i in range(22):
        if i in missing:
            continue
        before = h.node.slots.totals().received
        for _attempt in range(3):  # best effort: re-send a sample lost here (same stamp)
            pub.publish(image_msg(frame, T0 + i // 5, (i % 5) * 200_000_000))
            try:
                wait_for(lambda: h.node.slots.totals().received > before, 5, "delivery")
                break
            except AssertionError:
                pass
        sent += 1
    counts = h.node.slots.counts()["front"]
    assert counts.received == sent
    assert counts.lost_estimate == len(missing)
    wait_for(lambda: _kv(_status(h, "camera front"), "frames_lost_estimate") == str(len(missing)),
             30, "the estimate in /diagnostics")
    st = _status(h, "camera front")
    assert _kv(st, "camera_hz_estimate") == "5.00"


def test_reliable_camera_subscription_and_a_warning_for_best_effort_publishers(nodes):
    """cameras.front.reliability: reliable subscribes with RELIABLE QoS (every frame of a
    reliable publisher arrives); a best-effort publisher cannot match it, which the node counts
    and reports instead of staying silent."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image

    h = nodes(namespace="/rel", **{"cameras.front.topic": "cam",
                                   "cameras.front.reliability": "reliable",
                                   "sample_rate_hz": 0.5})
    h.watch_diagnostics()
    wait_for(lambda: h.probe.get_subscriptions_info_by_topic("/rel/cam"), 20, "the subscription")
    infos = h.probe.get_subscriptions_info_by_topic("/rel/cam")
    assert [i.qos_profile.reliability for i in infos] == [ReliabilityPolicy.RELIABLE]

    best_effort = h.probe.create_publisher(Image, "/rel/cam", qos_profile_sensor_data)
    wait_for(lambda: h.node._qos_events["front"] > 0, 30, "the incompatible-QoS event")
    h.probe.destroy_publisher(best_effort)
    wait_for(lambda: (_kv(_status(h, "camera front"), "incompatible_qos_events") or "0") != "0",
             30, "the event in /diagnostics")

    reliable = h.probe.create_publisher(Image, "/rel/cam", QoSProfile(
        depth=10, reliability=ReliabilityPolicy.RELIABLE))
    wait_for(lambda: reliable.get_subscription_count() > 0, 20, "matching")
    frame = clip_frames(1, width=64)[0]
    for i in range(10):
        reliable.publish(image_msg(frame, T0 + i))
        time.sleep(0.05)  # the subscription keeps the last 5: let its callback take each one
    wait_for(lambda: h.node.slots.totals().received == 10, 30, "all 10 reliable frames")
    assert h.node.slots.counts()["front"].lost_estimate == 0


def test_scene_topic_is_transient_local_depth_1(nodes):
    """~/scene keeps its last description for late subscribers (transient local, depth 1): a
    subscriber that comes after two descriptions gets the last one at once, and only it."""
    from rclpy.qos import DurabilityPolicy, QoSProfile

    from infmllm_ros.msg import SceneDescription

    h = nodes(namespace="/sc")
    wait_for(lambda: h.probe.get_publishers_info_by_topic(f"{h.fqn}/scene"), 20, "the publisher")
    (info,) = h.probe.get_publishers_info_by_topic(f"{h.fqn}/scene")
    assert info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
    for text in ("first description", "second description"):
        h.node.scene_pub.publish(SceneDescription(text=text))  # what _publish_scene sends
    got = []
    h.probe.create_subscription(SceneDescription, f"{h.fqn}/scene", got.append, QoSProfile(
        depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    wait_for(lambda: got, 20, "the last description, delivered to a late subscriber")
    time.sleep(0.5)
    assert [m.text for m in got] == ["second description"]
