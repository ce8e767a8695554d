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
