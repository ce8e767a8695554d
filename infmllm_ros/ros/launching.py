"""The launch descriptions behind ``launch/stream.launch.py`` and ``launch/replay.launch.py``.

One place builds both, so they cannot drift apart:

* the node (``infmllm-node``) with ``params_file`` plus the overrides that are
  set, under ``node_name`` in ``namespace``, ``log_level`` applied to its own
  logger only (``--log-level <logger>:=<level>``; a bare ``--log-level debug``
  turns on every rcl/rmw logger too);
* optionally ``infmllm-replay`` in the same namespace, waiting for the node's
  subscription (the node subscribes once its model is loaded and its worker
  runs), with ``/clock`` when ``use_sim_time`` is true;
* event handlers: when the node exits, the launch shuts down (a looping replay
  with it), and a non-zero exit of the node or the replay makes ``ros2 launch``
  fail (exit code 1, the only failure code launch has) with the reason logged;
  ``exit_after_replay`` ends the launch when a non-looping replay is done.

``launch``/``launch_ros`` are imported inside the functions: they are not on
PyPI, and the argument table here is read by tests that run without them.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

PACKAGE = "infmllm_ros"
NODE_EXECUTABLE = "infmllm-node"
REPLAY_EXECUTABLE = "infmllm-replay"
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")

#: (name, default, description) of every launch argument. A default of None is
#: the package's config/stream.yaml (a substitution, built when launching).
NODE_ARGUMENTS: List[Tuple[str, object, str]] = [
    ("params_file", None,
     "ros__parameters file of the node (its model.preset names config/models/<preset>.yaml)"),
    ("model_preset", "", "Model preset to use instead of the params file's, e.g. smollm2-offline, "
     "smolvlm-256m, smolvlm-500m, qwen2_5_vl_3b (empty: keep the params file's)"),
    ("camera_topic", "", "Image topic of camera 'front' (empty: keep the params file's; a "
     "relative name resolves in the namespace)"),
    ("camera_topics", "", "All cameras as name=topic[:raw|compressed], comma separated, e.g. "
     "'front=/c0/image_raw,rear=/c1/image_raw/compressed:compressed' (empty: the params file's)"),
    ("namespace", "", "Namespace of the node and of the replay: relative camera topics "
     "(the default camera/image_raw) and the replayed bag topics move into it"),
    ("node_name", "infmllm", "Name of the node (the params file is keyed /** and still applies)"),
    ("log_level", "info", "Logging level of the node's own logger: debug, info, warn, error, "
     "fatal (rcl/rmw loggers stay at info)"),
    ("use_sim_time", "false", "Node on simulated time from /clock; a replay then publishes "
     "/clock from the bag (infmllm-replay --clock)"),
]
REPLAY_ARGUMENTS: List[Tuple[str, object, str]] = [
    ("bag", "", "ROS 2 bag (folder) to replay into the node's camera topic(s)"),
    ("rate", "1.0", "Replay speed factor (1.0: real time)"),
    ("loop", "false", "Replay the bag in a loop"),
    ("exit_after_replay", "false", "End the launch (stopping the node cleanly) when a "
     "non-looping replay is done"),
]
USE_REPLAY = ("use_replay", "false", "Also replay `bag` (infmllm-replay) into the node's camera "
              "topic(s), starting once the node is ready")


def argument_table(replay: bool) -> List[Tuple[str, object, str]]:
    """The arguments of replay.launch.py (``replay``) or stream.launch.py."""
    if replay:
        return REPLAY_ARGUMENTS + NODE_ARGUMENTS
    return NODE_ARGUMENTS + [USE_REPLAY] + REPLAY_ARGUMENTS


def truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def node_logger_name(namespace: str, name: str) -> str:
    """rcl's logger name of node ``name`` in ``namespace`` ("/r1", "w" -> "r1.w")."""
    parts = [p for p in namespace.split("/") if p] + [name]
    return ".".join(parts)


def replay_remaps(bag_topics: List[str], camera_topic: str) -> Dict[str, str]:
    """Bag topic -> camera topic when the user named one camera topic and the bag has one
    image topic (so ``camera_topic:=...`` with any bag just works); otherwise none."""
    if camera_topic and len(bag_topics) == 1 and bag_topics[0] != camera_topic:
        return {bag_topics[0]: camera_topic}
    return {}


def _arguments(replay: bool):
    from launch.actions import DeclareLaunchArgument
    from launch.substitutions import PathJoinSubstitution
    from launch_ros.substitutions import FindPackageShare

    out = []
    for name, default, help_ in argument_table(replay):
        if default is None:
            default = PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "stream.yaml"])
        kw = {} if (replay and name == "bag") else {"default_value": default}
        out.append(DeclareLaunchArgument(name, description=help_, **kw))
    return out


def _actions(context, replay: bool):
    from launch.actions import LogInfo, RegisterEventHandler
    from launch.event_handlers import OnProcessExit
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    from .params import ParameterError, launch_overrides
    from .replay import BagError, image_topics

    names = [name for name, _d, _h in argument_table(replay)]
    get = {name: LaunchConfiguration(name).perform(context) for name in names}
    use_replay = replay or truthy(get.get("use_replay", "false"))
    level = get["log_level"].strip().lower()
    if level not in LOG_LEVELS:
        raise ParameterError(f"log_level must be one of {list(LOG_LEVELS)}, got {get['log_level']!r}")
    params: list = [get["params_file"]]
    overrides = launch_overrides(get["model_preset"], get["camera_topic"], get["camera_topics"])
    sim = truthy(get["use_sim_time"])
    overrides["use_sim_time"] = sim
    params.append(overrides)
    namespace, name = get["namespace"], get["node_name"]
    node = Node(
        package=PACKAGE, executable=NODE_EXECUTABLE, name=name, namespace=namespace,
        parameters=params, output="screen", emulate_tty=True,
        arguments=["--ros-args", "--log-level", f"{node_logger_name(namespace, name)}:={level}"],
    )
    actions = [node, RegisterEventHandler(OnProcessExit(
        target_action=node, on_exit=lambda event, ctx: _on_exit(event, ctx, "the node"),
    ))]
    if not use_replay:
        return actions
    if not get["bag"]:
        raise BagError("use_replay:=true needs bag:=<path to a ROS 2 bag>")
    cmd = [get["bag"], "--rate", get["rate"], "--wait-for-subscribers", "1", "--wait-timeout", "0"]
    if truthy(get["loop"]):
        cmd.append("--loop")
    if sim:
        cmd.append("--clock")
    for src, dst in replay_remaps(sorted(image_topics(get["bag"])), get["camera_topic"]).items():
        cmd += ["--remap", f"{src}:={dst}"]
    player = Node(package=PACKAGE, executable=REPLAY_EXECUTABLE, name="infmllm_replay",
                  namespace=namespace, arguments=cmd, output="screen")
    exit_after = truthy(get["exit_after_replay"]) and not truthy(get["loop"])
    actions += [
        LogInfo(msg=f"replaying {get['bag']} at rate {get['rate']} once the node is ready"
                + ("; the launch ends after it" if exit_after else "")),
        player,
        RegisterEventHandler(OnProcessExit(
            target_action=player,
            on_exit=lambda event, ctx: _on_exit(event, ctx, "the replay", shutdown=exit_after),
        )),
    ]
    return actions


def _on_exit(event, context, what: str, shutdown: bool = True):
    """OnProcessExit: a failure (non-zero exit) fails the launch; a clean exit of the node,
    or of a replay with exit_after_replay, shuts it down."""
    from launch.actions import LogInfo, Shutdown

    code = event.returncode
    if context.is_shutdown and code == 0:
        return None  # stopped by the launch's own shutdown
    if code != 0:
        # An exception in an event handler is how launch ends with a non-zero code.
        raise RuntimeError(f"{what} ({event.action.name}) exited with code {code}")
    if shutdown:
        return [Shutdown(reason=f"{what} ({event.action.name}) finished")]
    return [LogInfo(msg=f"{what} finished; the node keeps running "
                        "(exit_after_replay:=true ends the launch here)")]


def launch_description(replay: bool):
    """The LaunchDescription of replay.launch.py (``replay``) or stream.launch.py."""
    from launch import LaunchDescription
    from launch.actions import OpaqueFunction

    return LaunchDescription(_arguments(replay) + [
        OpaqueFunction(function=lambda context: _actions(context, replay))])
