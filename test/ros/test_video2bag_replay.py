"""infmllm-video2bag writes real bags from the shared clip; BagPlayer replays them over DDS.

The bag tests need no ROS (rosbags is pure Python). The replay tests publish
with real rclpy into a subscriber node in the same process, each in its own
Context (the ``ros_context`` fixture of test/ros/conftest.py), with bounded waits.
"""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("rosbags.rosbag2", reason="the rosbags package is not installed")

from infmllm_ros.ros.video2bag import VideoToBagError, main as video2bag_main, write_bag  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
START = 1700000000.75  # a fractional epoch time: stamps must be exact to the nanosecond
FRAMES = 20
WIDTH = 384


def _clip() -> Path:
    data = Path(os.environ.get("INFMLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = data / "video" / "vtest.avi"
    if not path.is_file():
        pytest.skip(f"shared clip {path} not found (set INFMLLM_SHARED_DATA to the shared data folder)")
    return path


def _read_bag(path: Path):
    """[(topic, bag_ns, message)] in bag order, via rosbags' reader."""
    from rosbags.highlevel import AnyReader

    with AnyReader([path]) as reader:
        return [(c.topic, t, reader.deserialize(raw, c.msgtype)) for c, t, raw in reader.messages()]


def _first_frames(n: int, width: int):
    capture = cv2.VideoCapture(str(_clip()))
    out = []
    try:
        while len(out) < n:
            ok, bgr = capture.read()
            assert ok
            height = round(bgr.shape[0] * width / bgr.shape[1])
            out.append(cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA),
                                    cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return out


@pytest.fixture(scope="module")
def raw_bag(tmp_path_factory):
    """20 rgb8 frames of vtest.avi at 384 px wide, written through the CLI."""
    out = tmp_path_factory.mktemp("bags") / "vtest_raw"
    rc = video2bag_main([str(_clip()), str(out), "--max-frames", str(FRAMES), "--start-time", str(START),
                         "--frame-id", "front_cam", "--width", str(WIDTH), "--quiet"])
    assert rc == 0
    return out


def test_video2bag_writes_every_frame_with_exact_stamps_and_frame_id(raw_bag):
    from infmllm_ros.ros.images import image_msg_to_rgb

    messages = _read_bag(raw_bag)
    assert len(messages) == FRAMES
    assert {topic for topic, _, _ in messages} == {"/camera/image_raw"}
    stamps_ns = [m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for _, _, m in messages]
    assert stamps_ns[0] == 1_700_000_000_750_000_000
    assert all(b - a == 100_000_000 for a, b in zip(stamps_ns, stamps_ns[1:]))  # 10 fps: 0.1 s apart
    assert [t for _, t, _ in messages] == stamps_ns  # receive time = stamp, so replays keep the timing
    assert {m.header.frame_id for _, _, m in messages} == {"front_cam"}
    first = messages[0][2]
    assert (first.width, first.height, first.encoding, first.step) == (WIDTH, 288, "rgb8", WIDTH * 3)
    expected = _first_frames(2, WIDTH)
    assert np.array_equal(image_msg_to_rgb(first), expected[0])
    assert np.array_equal(image_msg_to_rgb(messages[1][2]), expected[1])


def test_video2bag_compressed_mcap_with_fps_override(tmp_path):
    from infmllm_ros.ros.images import image_msg_to_rgb

    summary = write_bag(_clip(), tmp_path / "vtest_jpeg", compressed=True, storage="mcap", fps=5.0,
                        max_frames=6, skip=100, every=2, start_time=10.0, frame_id="cam", width=320)
    assert (summary.frames, summary.topic, summary.first_stamp, summary.last_stamp) == (
        6, "/camera/image_raw/compressed", 10.0, 11.0)
    messages = _read_bag(tmp_path / "vtest_jpeg")
    assert len(messages) == 6
    assert [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for _, _, m in messages] == pytest.approx(
        [10.0, 10.2, 10.4, 10.6, 10.8, 11.0])
    assert all(m.format == "jpeg" for _, _, m in messages)
    assert image_msg_to_rgb(messages[0][2]).shape == (240, 320, 3)


def test_video2bag_cli_reports_clear_errors(tmp_path, capsys, raw_bag):
    assert video2bag_main([str(tmp_path / "missing.avi"), str(tmp_path / "out")]) == 2
    assert "video not found" in capsys.readouterr().err
    assert video2bag_main([str(_clip()), str(raw_bag)]) == 2
    assert "exists" in capsys.readouterr().err
    not_a_video = tmp_path / "notes.avi"
    not_a_video.write_text("this is text, not a video\n")
    assert video2bag_main([str(not_a_video), str(tmp_path / "out2")]) == 2
    assert "cannot open" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    with pytest.raises(VideoToBagError, match="max-frames"):
        write_bag(_clip(), tmp_path / "out3", max_frames=0)


# -- replay over DDS -----------------------------------------------------------------

ros = pytest.mark.ros


def _subscriber(ctx, topic, qos):
    """A node that records every Image it gets on ``topic``, spun by its own executor thread."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    node = rclpy.create_node("replay_probe", context=ctx)
    received = []
    node.create_subscription(Image, topic, received.append, qos)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    return node, executor, thread, received


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _close(executor, thread, *nodes):
    executor.shutdown(timeout_sec=5)
    thread.join(timeout=5)
    for node in nodes:
        node.destroy_node()


@ros
def test_replay_delivers_every_message_with_original_stamp_and_frame_id(ros_context, raw_bag):
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from infmllm_ros.ros.images import image_msg_to_rgb
    from infmllm_ros.ros.replay import BagPlayer

    original = [m for _, _, m in _read_bag(raw_bag)]
    probe, executor, thread, received = _subscriber(
        ros_context, "/camera/image_raw", QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
    publisher_node = rclpy.create_node("replay_player", context=ros_context)
    player = BagPlayer(publisher_node, raw_bag, rate=4.0, qos="reliable")
    try:
        assert player.wait_for_subscribers(timeout=10.0), "the probe never matched the player's publisher"
        player.start()
        assert player.wait(timeout=30.0), "playback did not finish"
        assert player.error is None
        assert _wait_for(lambda: len(received) >= FRAMES, 15.0), f"got {len(received)} of {FRAMES}"
    finally:
        player.destroy()
        _close(executor, thread, probe, publisher_node)
    assert player.published == FRAMES and player.passes == 1
    stamps = [(m.header.stamp.sec, m.header.stamp.nanosec) for m in received]
    assert stamps == [(m.header.stamp.sec, m.header.stamp.nanosec) for m in original]
    assert {m.header.frame_id for m in received} == {"front_cam"}
    assert np.array_equal(image_msg_to_rgb(received[5]), image_msg_to_rgb(original[5]))


@ros
def test_replay_with_sensor_qos_remap_and_loop(ros_context, raw_bag):
    import rclpy
    from rclpy.qos import qos_profile_sensor_data

    from infmllm_ros.ros.replay import BagPlayer

    originals = {(m.header.stamp.sec, m.header.stamp.nanosec) for _, _, m in _read_bag(raw_bag)}
    probe, executor, thread, received = _subscriber(ros_context, "/front/image", qos_profile_sensor_data)
    publisher_node = rclpy.create_node("replay_player", context=ros_context)
    player = BagPlayer(publisher_node, raw_bag, rate=10.0, loop=True,
                       remap={"/camera/image_raw": "/front/image"})
    try:
        assert player.published_topics == {"/camera/image_raw": "/front/image"}
        assert player.wait_for_subscribers(timeout=10.0)
        player.start()
        # Best effort may drop a few; a second pass proves the loop.
        assert _wait_for(lambda: player.passes >= 1 and len(received) > FRAMES // 2, 30.0), (
            f"passes={player.passes} received={len(received)}")
        assert player.running  # still looping until stopped
    finally:
        player.destroy()
        _close(executor, thread, probe, publisher_node)
    assert not player.running and player.error is None
    assert {(m.header.stamp.sec, m.header.stamp.nanosec) for m in received} <= originals


@ros
def test_replay_refuses_unknown_topics_and_missing_bags_with_the_available_list(ros_context, raw_bag, tmp_path):
    import rclpy

    from infmllm_ros.ros.replay import BagError, BagPlayer, main as replay_main

    node = rclpy.create_node("replay_errors", context=ros_context)
    try:
        with pytest.raises(BagError, match=r"/camera/image_raw \(Image\)"):
            BagPlayer(node, raw_bag, topics=["/no/such/topic"])
        with pytest.raises(BagError, match="bag not found"):
            BagPlayer(node, tmp_path / "nothing_here")
        with pytest.raises(BagError, match="rate"):
            BagPlayer(node, raw_bag, rate=0.0)
    finally:
        node.destroy_node()
    assert replay_main([str(tmp_path / "nothing_here")]) == 2
    assert replay_main([str(raw_bag), "--remap", "no-separator"]) == 2


def _replay_process(tmp_path, *args):
    """``infmllm-replay`` as its own process (its entry point), output collected."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "infmllm_ros.ros.replay", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path))  # not the repo root: -m would import the sources


@ros
def test_replay_waits_for_a_late_subscriber_and_delivers_every_message(ros_context, raw_bag, tmp_path):
    """A replay started before anyone subscribes waits (with a message) for the subscriber,
    then --delay more, and delivers all 20 messages (reliable QoS); it used to publish at once
    into no subscriber and lose them."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    proc = _replay_process(tmp_path, raw_bag, "--rate", "10", "--qos", "reliable",
                           "--wait-for-subscribers", "1", "--wait-timeout", "60", "--delay", "0.2")
    try:
        time.sleep(2.0)  # the replay is up and waiting: nobody subscribes yet
        assert proc.poll() is None, proc.communicate()[0]
        probe, executor, thread, received = _subscriber(
            ros_context, "/camera/image_raw", QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
        try:
            out = proc.communicate(timeout=90)[0]
            assert _wait_for(lambda: len(received) >= FRAMES, 15.0), (len(received), out)
        finally:
            _close(executor, thread, probe)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "waiting for 1 subscriber(s) on /camera/image_raw" in out
    assert f"{FRAMES} messages published" in out
    assert len(received) == FRAMES


@ros
def test_replay_gives_up_waiting_with_a_message_and_plays(raw_bag, tmp_path):
    proc = _replay_process(tmp_path, raw_bag, "--rate", "20", "--wait-timeout", "0.5")
    out = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, out
    assert "no subscriber on /camera/image_raw after 0.5 s (--wait-timeout)" in out
    assert f"{FRAMES} messages published" in out
    bad = _replay_process(tmp_path, raw_bag, "--delay", "-1")
    out = bad.communicate(timeout=90)[0]
    assert bad.returncode == 2 and "--delay must be >= 0" in out


@ros
def test_replay_in_a_namespace_with_ros_remapping_and_clock(ros_context, raw_bag, tmp_path):
    """`--ros-args -r __ns:=/r7` moves the bag's /camera/image_raw to /r7/camera/image_raw, a
    ROS remapping rule moves it further, and --clock publishes /clock from the bag's time."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    node = rclpy.create_node("ns_probe", context=ros_context)
    images, other, clock = [], [], []
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, "/r7/camera/image_raw", images.append, reliable)
    node.create_subscription(Image, "/camera/image_raw", other.append, reliable)
    node.create_subscription(Clock, "/clock", clock.append, QoSProfile(
        depth=10, reliability=ReliabilityPolicy.BEST_EFFORT))
    node.create_subscription(Image, "/r7/cam_left", other.append, reliable)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        out = _replay_process(tmp_path, raw_bag, "--rate", "5", "--qos", "reliable", "--clock", "50",
                              "--ros-args", "-r", "__ns:=/r7").communicate(timeout=90)[0]
        assert _wait_for(lambda: len(images) >= FRAMES, 15.0), (len(images), out)
        assert "/camera/image_raw -> /r7/camera/image_raw" in out and "/clock at 50 Hz" in out
        ns = [c.clock.sec * 1_000_000_000 + c.clock.nanosec for c in clock]
        assert ns, "no /clock message"
        first = 1_700_000_000_750_000_000
        last = first + (FRAMES - 1) * 100_000_000
        assert all(first <= t <= last + 500_000_000 for t in ns), ns  # the bag's time (+ a tick)
        assert ns == sorted(ns)  # never backwards
        moved = _replay_process(tmp_path, raw_bag, "--rate", "20", "--qos", "reliable",
                                "--ros-args", "-r", "__ns:=/r7", "-r", "camera/image_raw:=cam_left")
        out = moved.communicate(timeout=90)[0]
        assert _wait_for(lambda: len(other) >= FRAMES, 15.0), (len(other), out)
    finally:
        _close(executor, thread, node)
    assert len(images) == FRAMES and {m.header.frame_id for m in other} == {"front_cam"}
