"""Draw what the describer saw onto the frame: boxes, class, track id (for ``~/debug_image``).

Uses ``supervision``'s annotators (one colour per class, labels above the
boxes); no ROS here, the node turns the result into a ``sensor_msgs/Image``.
"""

from __future__ import annotations

import numpy as np

from .describer import Observation
from .frames import validate_frame

__all__ = ["draw_observation"]


def draw_observation(frame_rgb: np.ndarray, obs: Observation) -> np.ndarray:
    """A copy of the RGB ``uint8`` ``(H, W, 3)`` frame with ``obs``'s objects drawn.

    Each object gets its box and a label ``"person 3 0.85"`` (class, track id
    when tracked, score). The input frame is not modified.
    """
    import supervision as sv

    image = validate_frame(frame_rgb).copy()
    if not obs.objects:
        return image
    xywh = np.array([o.box for o in obs.objects], dtype=np.float32)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    names = sorted({o.label for o in obs.objects})
    detections = sv.Detections(xyxy=xyxy, class_id=np.array([names.index(o.label) for o in obs.objects]),
                               confidence=np.array([o.score for o in obs.objects], dtype=np.float32))
    labels = [f"{o.label} {o.track_id} {o.score:.2f}" if o.track_id else f"{o.label} {o.score:.2f}"
              for o in obs.objects]
    thickness = max(1, round(image.shape[1] / 640))
    image = sv.BoxAnnotator(thickness=thickness).annotate(image, detections)
    image = sv.LabelAnnotator(text_scale=0.4 * thickness, text_thickness=thickness, text_padding=2).annotate(
        image, detections, labels=labels)
    return image
