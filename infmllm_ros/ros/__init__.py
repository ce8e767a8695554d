"""The ROS 2 side: node, parameters, image conversion, bag replay. Imports rclpy only in the modules that need it."""
