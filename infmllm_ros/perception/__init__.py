"""Frame perception without ROS: validate frames, describe them, encode them into chunks.

``frames`` is the gate every image passes (RGB uint8 HxWx3); ``detector``
(YOLOv3-tiny or the user's own via ``cv2.dnn``), ``tracking`` (ByteTrack, short
ids, events) and ``describer`` turn a frame into one factual line and a
structured ``Observation``; ``draw`` paints it for a debug view; ``encoders``
turns a frame into a :class:`infmllm_ros.engine.types.Chunk`; ``hog`` is the
previous HOG/Haar describer, kept as the benchmark baseline.
Nothing in this package imports ROS, so benchmarks and tests use it directly.
"""

from .frames import FrameError, validate_frame

__all__ = ["FrameError", "validate_frame"]
