"""Replay a bag into the `infmllm` node, starting once the node is ready.

    ros2 launch infmllm_ros replay.launch.py bag:=/data/vtest_bag rate:=1.0
    ros2 launch infmllm_ros replay.launch.py bag:=/data/vtest_bag exit_after_replay:=true
    ros2 launch infmllm_ros replay.launch.py bag:=/data/vtest_bag namespace:=robot1 use_sim_time:=true

Make a bag from a video with `infmllm-video2bag VIDEO OUT_BAG`. The node's
arguments are those of stream.launch.py (params_file, model_preset,
camera_topic(s), namespace, node_name, log_level, use_sim_time); the replay
publishes the bag's topics in the namespace (or onto camera_topic when the bag
has one image topic) and waits for the node's subscription before its first
message. exit_after_replay:=true ends the launch when a non-looping replay is
done. Built in infmllm_ros/ros/launching.py, shared with stream.launch.py.
"""

from infmllm_ros.ros.launching import launch_description


def generate_launch_description():
    return launch_description(replay=True)
