"""The node with the offline describer: ``~/debug_image`` between two rclpy nodes, a detector that
fails on a frame, detector files that cannot load. Real DDS, the real SmolLM2 and YOLOv3-tiny."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")
pytest.importorskip("supervision", reason="supervision (ByteTrack) is not installed")

from nodekit import Harness, clip_frames, image_msg, node_test_marks, wait_for  # noqa: E402

pytestmark = node_test_marks()

T0 = 1_700_000_000
NS = 123_456_789


@pytest.fixture(scope="module")
def frames():
    return clip_frames(3, every=10, width=768)  # full size: the pedestrians are big enough for YOLO


@pytest.fixture
def node(ros_context, smollm2):
    h = Harness(ros_context, smollm2, params={"cameras.front.topic": "/t/cam", "sample_rate_hz": 50.0,
                                               "diagnostics.period_s": 0.0})
    yield h
    h.close()


def offer(h, frame, i):
    """Publish frame ``i`` (stamped T0 + i, +NS) until the worker took it in (encoded or bad)."""
    pub = h.publisher("/t/cam")
    h.wait_subscribed("/t/cam")
    before = h.node.slots.totals()
    taken = lambda: (lambda n: n.encoded + n.bad > before.encoded + before.bad)(h.node.slots.totals())  # noqa: E731
    for _ in range(5):  # best-effort QoS: a sample can be lost right after discovery
        pub.publish(image_msg(frame, T0 + i, NS, "cam_optical"))
        try:
            wait_for(taken, 30, f"frame {i} taken in")
            return
        except AssertionError:
            continue
    raise AssertionError(f"frame {i} was never taken in")


@pytest.mark.slow
def test_debug_image_round_trip_only_while_subscribed(node, frames):
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import Image

    offer(node, frames[0], 0)
    assert node.node.debug_images_published == 0  # nobody listens: nothing drawn
    got = []
    sub = node.probe.create_subscription(Image, f"{node.fqn}/debug_image", got.append, QoSProfile(depth=5))
    wait_for(lambda: node.node.debug_pub.get_subscription_count() > 0, 20, "a ~/debug_image subscriber")
    offer(node, frames[1], 1)
    wait_for(lambda: got, 30, "a debug image")
    m = got[-1]
    assert (m.header.stamp.sec, m.header.stamp.nanosec) == (T0 + 1, NS)  # the source frame's header
    assert m.header.frame_id == "cam_optical"
    assert (m.encoding, m.height, m.width) == ("rgb8", frames[1].shape[0], frames[1].shape[1])
    drawn = np.frombuffer(bytes(m.data), np.uint8).reshape(m.height, m.step)[:, : m.width * 3]
    drawn = drawn.reshape(m.height, m.width, 3)
    obs = node.node.encoder.last_observation
    assert obs.stamp == pytest.approx(T0 + 1 + NS * 1e-9) and obs.people >= 2, obs.text
    changed = np.any(drawn != frames[1], axis=2)
    for o in obs.objects:  # each box's outline is drawn
        x, y, w, h = o.box
        assert changed[y:y + h, x:x + w].any(), o
    assert not changed[-40:, :200].any()  # the lawn at the bottom left holds no object: untouched
    published = node.node.debug_images_published
    node.probe.destroy_subscription(sub)
    wait_for(lambda: node.node.debug_pub.get_subscription_count() == 0, 20, "the subscriber gone")
    offer(node, frames[2], 2)
    assert node.node.debug_images_published == published


@pytest.mark.slow
def test_a_frame_the_detector_fails_on_is_counted_bad_and_the_node_goes_on(node, frames, fail_next_forward):
    fail_next_forward(node.node.encoder.describer.detector)
    offer(node, frames[0], 0)
    counts = node.node.slots.counts()["front"]
    assert counts.bad == 1 and counts.encoded == 0 and "detector failed" in counts.last_error
    offer(node, frames[1], 1)
    assert node.node.slots.counts()["front"].encoded == 1 and node.node.worker.alive
    r = node.ask("How many people were seen?", max_new_tokens=8)
    assert r.success and (r.newest_frame_stamp.sec, r.newest_frame_stamp.nanosec) == (T0 + 1, NS)


def test_missing_detector_weights_stop_the_start_naming_the_file(ros_context, smollm2, tmp_path):
    from rclpy.parameter import Parameter

    from infmllm_ros.ros.node import InfMllmNode
    from infmllm_ros.ros.params import ParameterError

    names = tmp_path / "my.names"
    names.write_text("person\n")
    missing = tmp_path / "my_detector.onnx"
    with pytest.raises(ParameterError, match=str(missing)):
        InfMllmNode(loaded_model=smollm2, context=ros_context, parameter_overrides=[
            Parameter("encoder.detector.model", value=str(missing)),
            Parameter("encoder.detector.names", value=str(names))])
    broken = tmp_path / "broken.onnx"  # exists and is not empty: only OpenCV can tell
    broken.write_bytes(b"this is not an ONNX protobuf")
    with pytest.raises(ParameterError, match=str(broken)):
        InfMllmNode(loaded_model=smollm2, context=ros_context, parameter_overrides=[
            Parameter("encoder.detector.model", value=str(broken)),
            Parameter("encoder.detector.names", value=str(names))])
