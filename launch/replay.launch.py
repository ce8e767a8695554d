"""Replay a bag into the `infmllm` node: stream.launch.py with use_replay:=true.

    ros2 launch infmllm_ros replay.launch.py bag:=/data/vtest_bag rate:=1.0

Make a bag from a video with `infmllm-video2bag VIDEO OUT_BAG`. Every argument
of stream.launch.py (params_file, model_preset, camera_topic(s), namespace ...)
is passed through.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    stream = PathJoinSubstitution([FindPackageShare("infmllm_ros"), "launch", "stream.launch.py"])
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="ROS 2 bag (folder) to replay into the node"),
        DeclareLaunchArgument("rate", default_value="1.0", description="Replay speed factor"),
        DeclareLaunchArgument("loop", default_value="false", description="Replay in a loop"),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(stream),
            launch_arguments={
                "use_replay": "true",
                "bag": LaunchConfiguration("bag"),
                "rate": LaunchConfiguration("rate"),
                "loop": LaunchConfiguration("loop"),
            }.items(),
        ),
    ])
