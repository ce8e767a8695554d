"""Start the `infmllm` node (and, optionally, replay a bag into it).

    ros2 launch infmllm_ros stream.launch.py
    ros2 launch infmllm_ros stream.launch.py model_preset:=smolvlm-256m camera_topic:=/cam/image_raw
    ros2 launch infmllm_ros stream.launch.py camera_topics:="front=/c0/image_raw,rear=/c1/image_raw/compressed:compressed"
    ros2 launch infmllm_ros stream.launch.py use_replay:=true bag:=/data/clip_bag rate:=2.0
    ros2 launch infmllm_ros stream.launch.py namespace:=robot1 node_name:=watcher log_level:=debug

Parameters come from `params_file` (default config/stream.yaml, which names a
model preset in config/models/); the launch arguments override them only when
set. The launch ends when the node exits, and fails if it exits with an error.
The arguments and actions are built in infmllm_ros/ros/launching.py, shared
with replay.launch.py.
"""

from infmllm_ros.ros.launching import launch_description


def generate_launch_description():
    return launch_description(replay=False)
