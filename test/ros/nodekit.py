"""Helpers for the node tests: a node + probe on a background executor, clip frames, bounded waits.

Not a fake of anything: the node under test is the real ``InfMllmNode`` on the
real engine; these only publish real images and call the real services.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STREAM_YAML = REPO / "config" / "stream.yaml"


def node_test_marks() -> list:
    """The marks of a test module that runs the node on the real model and the shared clip."""
    import pytest

    return [
        pytest.mark.ros,
        pytest.mark.model,
        pytest.mark.usefixtures("interfaces"),
        pytest.mark.skipif(shared_clip() is None, reason="shared/data/video/vtest.avi is missing"),
    ]


def shared_clip() -> Optional[Path]:
    """The shared vtest.avi (INFMLLM_SHARED_DATA or <repo>/../shared/data), if present."""
    roots = [os.environ.get("INFMLLM_SHARED_DATA", ""), str(REPO.parent / "shared" / "data")]
    for root in roots:
        if root and (Path(root) / "video" / "vtest.avi").is_file():
            return Path(root) / "video" / "vtest.avi"
    return None


def clip_frames(n: int, every: int = 10, width: int = 384) -> List[np.ndarray]:
    """``n`` RGB frames of the shared clip, one every ``every`` frames, resized to ``width``."""
    import cv2

    path = shared_clip()
    if path is None:
        raise FileNotFoundError("shared/data/video/vtest.avi is missing")
    cap = cv2.VideoCapture(str(path))
    out, i = [], 0
    try:
        while len(out) < n:
            ok, bgr = cap.read()
            if not ok:
                break
            if i % every == 0:
                h = int(round(bgr.shape[0] * width / bgr.shape[1]))
                out.append(cv2.cvtColor(cv2.resize(bgr, (width, h)), cv2.COLOR_BGR2RGB))
            i += 1
    finally:
        cap.release()
    return out


def image_msg(rgb: np.ndarray, sec: int, nanosec: int = 0, frame_id: str = "camera_optical"):
    from sensor_msgs.msg import Image

    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = int(sec), int(nanosec)
    m.header.frame_id = frame_id
    m.height, m.width = int(rgb.shape[0]), int(rgb.shape[1])
    m.encoding = "rgb8"
    m.step = m.width * 3
    m.data = np.ascontiguousarray(rgb).tobytes()
    return m


def compressed_msg(rgb: np.ndarray, sec: int, nanosec: int = 0, frame_id: str = "camera_optical"):
    import cv2
    from sensor_msgs.msg import CompressedImage

    m = CompressedImage()
    m.header.stamp.sec, m.header.stamp.nanosec = int(sec), int(nanosec)
    m.header.frame_id = frame_id
    m.format = "jpeg"
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    m.data = buf.tobytes()
    return m


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``pred`` until true; AssertionError naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@contextlib.contextmanager
def harness_factory(context, lm, **defaults):
    """Yields ``make(**params) -> Harness`` (``defaults`` under ``params``); closes them all after."""
    made = []

    def make(**params):
        h = Harness(context, lm, params={**defaults, **params})
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


class Harness:
    """An ``InfMllmNode`` plus a probe node, spun by one MultiThreadedExecutor in a thread."""

    def __init__(self, context, lm, params=None, cli_args=None, name="infmllm", namespace="/t"):
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node
        from rclpy.parameter import Parameter

        from infmllm_ros.ros.node import InfMllmNode

        overrides = [Parameter(k, value=v) for k, v in (params or {}).items()]
        self.node = InfMllmNode(name, loaded_model=lm, context=context, namespace=namespace,
                                parameter_overrides=overrides, cli_args=cli_args)
        self.probe = Node("probe", context=context, namespace=namespace)
        self.executor = MultiThreadedExecutor(num_threads=self.node.executor_threads() + 2,
                                              context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.probe)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        self.ns = namespace.rstrip("/")
        self.fqn = self.node.get_fully_qualified_name()
        self.scenes: list = []
        self.diagnostics: list = []
        self._pubs: dict = {}

    def _spin(self):
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, KeyboardInterrupt):
            pass

    # -- probe side ------------------------------------------------------------------

    def publisher(self, topic: str, compressed: bool = False):
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        if topic not in self._pubs:
            self._pubs[topic] = self.probe.create_publisher(
                CompressedImage if compressed else Image, topic, qos_profile_sensor_data)
        return self._pubs[topic]

    def wait_subscribed(self, topic: str, timeout: float = 20.0) -> None:
        pub = self._pubs[topic]
        wait_for(lambda: pub.get_subscription_count() > 0, timeout, f"a subscriber on {topic}")

    def watch_scenes(self):
        from rclpy.qos import QoSProfile

        from infmllm_ros.msg import SceneDescription

        self.probe.create_subscription(SceneDescription, f"{self.fqn}/scene",
                                       self.scenes.append, QoSProfile(depth=50))

    def watch_diagnostics(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile

        self.probe.create_subscription(DiagnosticArray, "/diagnostics",
                                       self.diagnostics.append, QoSProfile(depth=50))

    def client(self, srv_type, name: str):
        c = self.probe.create_client(srv_type, f"{self.fqn}/{name}")
        assert c.wait_for_service(timeout_sec=20.0), f"service {name} not available"
        return c

    def call(self, srv_type, name: str, timeout: float = 120.0, **fields):
        fut = self.call_async(srv_type, name, **fields)
        return self.result(fut, timeout, name)

    def call_async(self, srv_type, name: str, **fields):
        key = f"_client_{name}"
        if not hasattr(self, key):
            setattr(self, key, self.client(srv_type, name))
        req = srv_type.Request()
        for k, v in fields.items():
            setattr(req, k, v)
        return getattr(self, key).call_async(req)

    @staticmethod
    def result(fut, timeout: float, what: str = "a response"):
        wait_for(fut.done, timeout, what)
        return fut.result()

    def stats(self):
        from infmllm_ros.srv import GetStats

        return self.call(GetStats, "get_stats", timeout=30.0)

    def ask(self, question: str, timeout: float = 180.0, **fields):
        from infmllm_ros.srv import Query

        return self.call(Query, "query", timeout=timeout, question=question, **fields)

    def set_params(self, **values):
        from rclpy.parameter import Parameter

        res = self.node.set_parameters([Parameter(k.replace("__", "."), value=v)
                                        for k, v in values.items()])
        assert all(r.successful for r in res), [r.reason for r in res]

    def close(self):
        self.node.shutdown()
        self.executor.shutdown(timeout_sec=10.0)
        self.node.destroy_node()
        self.probe.destroy_node()
        self._thread.join(10.0)


class NodeProcess:
    """A real ``infmllm-node`` process (``python -m infmllm_ros.ros.node``, the executable's
    entry point), its output collected line by line in a thread."""

    def __init__(self, *ros_args: str, cwd: Optional[Path] = None, env: Optional[dict] = None):
        import subprocess
        import sys

        # Not from the repository root: `-m` would put the source tree (without the
        # generated interfaces) ahead of the installed package.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infmllm_ros.ros.node", "--ros-args", *ros_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=str(cwd or Path("/")), env=dict(env or os.environ))
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float) -> None:
        wait_for(lambda: any(text in ln for ln in self.lines) or self.proc.poll() is not None,
                 timeout, f"'{text}' from the node")
        assert any(text in ln for ln in self.lines), (
            f"node exited ({self.proc.returncode}) before '{text}':\n{self.output[-3000:]}")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def inet_sockets(self):
        """(ip, port, type) of every IPv4/IPv6 socket the process holds (psutil)."""
        import psutil

        return [(c.laddr.ip, c.laddr.port, c.type.name)
                for c in psutil.Process(self.proc.pid).net_connections(kind="inet")]


class Probe:
    """A probe node in its own context spun in a thread (for talking to node processes)."""

    def __init__(self, context, name: str = "probe"):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        self.node = Node(name, context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, KeyboardInterrupt):
            pass

    def close(self):
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()
        self._thread.join(5)
