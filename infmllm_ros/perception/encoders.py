"""Frame encoders: one camera frame in, one :class:`~infmllm_ros.engine.types.Chunk` out.

An encoder is anything with a ``name`` and ``encode(frame_rgb, camera, stamp)``
(:class:`FrameEncoder`). Each one also offers ``from_model(lm, **options)`` so
:func:`make_encoder` can build it from the engine's loaded model by name; the
names live in the :data:`ENCODERS` registry at the bottom of this file.

This file holds the offline encoder (YOLOv3-tiny detections + ByteTrack tracks
-> one line of text -> token ids). A VLM encoder (the model's processor and vision tower) sits beside
it and registers itself in :data:`ENCODERS` the same way.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from infmllm_ros.engine.types import Chunk

from .describer import DescriberConfig, FrameDescriber
from .detector import DetectorConfig, take_detector
from .tracking import TrackerConfig

__all__ = ["FrameEncoder", "OfflineTextEncoder", "ENCODERS", "make_encoder"]


@runtime_checkable
class FrameEncoder(Protocol):
    """Turns one RGB frame into a chunk the stream can append.

    ``encode`` gets a ``uint8`` ``(H, W, 3)`` RGB array (see
    :func:`infmllm_ros.perception.frames.validate_frame`), the camera's name
    and the frame's stamp in seconds since the epoch, and returns a
    ``Chunk`` with ``kind="frame"``, ``camera`` and ``stamp`` set. It raises
    ``ValueError`` (``FrameError``) for a frame it cannot use.
    """

    name: str

    def encode(self, frame_rgb: np.ndarray, camera: str, stamp: float) -> Chunk: ...


class OfflineTextEncoder:
    """Describe the frame in one line of text and tokenize it for a text-only model.

    The line comes from :class:`FrameDescriber` (objects of 80 classes with
    where and in which colour, tracks and their events). ``template`` wraps it, with the fields ``{line}``,
    ``{camera}`` and ``{stamp}``; the result always ends with a newline, so
    consecutive observations stay separate lines in the stream and the model
    sees where one ends.

    Args:
        tokenizer: a Hugging Face tokenizer (called with
            ``add_special_tokens=False``: a frame is the middle of a stream,
            not the start of a document).
        describer: the describer to use; a default :class:`FrameDescriber`
            (the bundled YOLOv3-tiny) when omitted. Pass one to share its
            tracks or to tune it.
        template: format string for the text appended per frame.

    Example:
        >>> enc = OfflineTextEncoder(tokenizer)
        >>> chunk = enc.encode(frame_rgb, "front", 1700000000.0)
        >>> chunk.text
        '22:13:20 front: 1 person in black (centre); person 1 appeared centre\\n'
    """

    name = "offline"

    def __init__(self, tokenizer: Any, describer: Optional[FrameDescriber] = None, template: str = "{line}\n") -> None:
        if tokenizer is None:
            raise ValueError("OfflineTextEncoder needs a tokenizer")
        try:
            template.format(line="", camera="", stamp=0.0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template may only use {{line}}, {{camera}} and {{stamp}}: {err}") from None
        if "{line}" not in template:
            raise ValueError("template must contain {line}, or the observation is lost")
        self.tokenizer = tokenizer
        self.describer = describer if describer is not None else FrameDescriber()
        self.template = template
        self.last_observation = None  # the most recent Observation (the debug image draws it)

    @classmethod
    def from_model(cls, lm: Any, detector: Optional[DetectorConfig] = None,
                   tracker: Optional[TrackerConfig] = None, **options: Any) -> "OfflineTextEncoder":
        """Build from a loaded model (anything with ``.tokenizer``).

        ``detector`` and ``tracker`` configure the default describer (ignored
        when ``describer`` is given). VLM-only options (``image_size``,
        ``max_pixels``, ``min_pixels``) are accepted and ignored, so callers
        can pass one option set to any encoder.

        Raises:
            DetectorLoadError: (a ``ValueError``) a detector file is missing or unusable.
        """
        for vlm_only in ("image_size", "max_pixels", "min_pixels"):
            options.pop(vlm_only, None)
        if options.get("describer") is None and (detector is not None or tracker is not None):
            detector = detector or DetectorConfig()
            options["describer"] = FrameDescriber(DescriberConfig(detector=detector, tracker=tracker or TrackerConfig()),
                                                  detector=take_detector(detector))
        return cls(lm.tokenizer, **options)

    def reset(self, camera: Optional[str] = None) -> None:
        """Forget what the describer tracks (one camera's, or all): after a memory reset, a
        line that said "person 3 stayed 40 s" would point at frames no longer in memory."""
        self.describer.reset(camera)
        if camera is None or (self.last_observation is not None
                              and self.last_observation.camera == camera):
            self.last_observation = None

    def text_for(self, frame_rgb: np.ndarray, camera: str, stamp: float) -> str:
        """The text one frame becomes (described and templated, newline-terminated)."""
        obs = self.describer.describe(frame_rgb, camera, stamp)
        self.last_observation = obs
        text = self.template.format(line=obs.text, camera=camera, stamp=stamp)
        return text if text.endswith("\n") else text + "\n"

    def encode(self, frame_rgb: np.ndarray, camera: str, stamp: float) -> Chunk:
        text = self.text_for(frame_rgb, camera, stamp)
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        input_ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        return Chunk(input_ids=input_ids, kind="frame", camera=camera, stamp=float(stamp), text=text)


def make_encoder(kind: str, lm: Any, **options: Any) -> FrameEncoder:
    """Build the encoder registered as ``kind`` for the loaded model ``lm``.

    ``options`` go to the encoder's ``from_model``; each encoder ignores the
    options meant for the others (see :meth:`OfflineTextEncoder.from_model`).
    """
    try:
        encoder_class = ENCODERS[kind]
    except KeyError:
        raise ValueError(f"unknown frame encoder {kind!r}; known: {sorted(ENCODERS)}") from None
    return encoder_class.from_model(lm, **options)


#: name -> encoder class with ``from_model(lm, **options)``. Extend it beside
#: the class you add, e.g. ``ENCODERS["vlm"] = VlmEncoder``.
ENCODERS: dict[str, Any] = {"offline": OfflineTextEncoder}

# The VLM encoder lives in vlm.py (which does not import this module, so no cycle).
from .vlm import VlmEncoder  # noqa: E402

ENCODERS["vlm"] = VlmEncoder
