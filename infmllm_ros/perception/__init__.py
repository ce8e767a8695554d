"""Frame perception without ROS: validate frames, describe them, encode them into chunks.

``frames`` is the gate every image passes (RGB uint8 HxWx3), ``describer`` turns
a frame into one factual line using the trained detectors OpenCV ships, and
``encoders`` turns a frame into a :class:`infmllm_ros.engine.types.Chunk`.
Nothing in this package imports ROS, so benchmarks and tests use it directly.
"""

from .frames import FrameError, validate_frame

__all__ = ["FrameError", "validate_frame"]
