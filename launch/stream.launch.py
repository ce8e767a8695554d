"""Start the `infmllm` node (and, optionally, replay a bag into it).

    ros2 launch infmllm_ros stream.launch.py
    ros2 launch infmllm_ros stream.launch.py model_preset:=smolvlm-256m camera_topic:=/cam/image_raw
    ros2 launch infmllm_ros stream.launch.py camera_topics:="front=/c0/image_raw,rear=/c1/image_raw/compressed:compressed"
    ros2 launch infmllm_ros stream.launch.py use_replay:=true bag:=/data/clip_bag rate:=2.0

Parameters come from `params_file` (default config/stream.yaml, which names a
model preset in config/models/); the launch arguments below override them only
when set.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "infmllm_ros"

ARGUMENTS = [
    ("params_file", PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "stream.yaml"]),
     "ros__parameters file of the node (its model.preset names config/models/<preset>.yaml)"),
    ("model_preset", "", "Model preset to use instead of the params file's, e.g. smollm2-offline, "
     "smolvlm-256m, smolvlm-500m, qwen2_5_vl_3b (empty: keep the params file's)"),
    ("camera_topic", "", "Image topic of camera 'front' (empty: keep the params file's)"),
    ("camera_topics", "", "All cameras as name=topic[:raw|compressed], comma separated, e.g. "
     "'front=/c0/image_raw,rear=/c1/image_raw/compressed:compressed' (empty: the params file's)"),
    ("namespace", "", "Namespace of the node (and of the replayed topics)"),
    ("node_name", "infmllm", "Name of the node"),
    ("log_level", "info", "Logging level of the node: debug, info, warn, error"),
    ("use_replay", "false", "Also replay `bag` (infmllm-replay) into the node's camera topic(s)"),
    ("bag", "", "ROS 2 bag (folder) to replay when use_replay is true"),
    ("rate", "1.0", "Replay speed factor (1.0: real time)"),
    ("loop", "false", "Replay the bag in a loop"),
]


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _actions(context, *_args, **_kwargs):
    from infmllm_ros.ros.params import launch_overrides

    get = {name: LaunchConfiguration(name).perform(context) for name, _d, _h in ARGUMENTS}
    params = [get["params_file"]]
    overrides = launch_overrides(get["model_preset"], get["camera_topic"], get["camera_topics"])
    if overrides:
        params.append(overrides)
    actions = [
        Node(
            package=PACKAGE,
            executable="infmllm_node",
            name=get["node_name"],
            namespace=get["namespace"],
            parameters=params,
            arguments=["--ros-args", "--log-level", get["log_level"]],
            output="screen",
            emulate_tty=True,
        )
    ]
    if _truthy(get["use_replay"]):
        if not get["bag"]:
            raise RuntimeError("use_replay:=true needs bag:=<path to a ROS 2 bag>")
        cmd = ["infmllm-replay", get["bag"], "--rate", get["rate"]]
        if _truthy(get["loop"]):
            cmd.append("--loop")
        actions.append(LogInfo(msg=f"replaying {get['bag']} at rate {get['rate']}"))
        actions.append(ExecuteProcess(cmd=cmd, output="screen", name="infmllm_replay"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=help_)
         for name, default, help_ in ARGUMENTS]
        + [OpaqueFunction(function=_actions)]
    )
