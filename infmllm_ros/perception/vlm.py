"""The VLM frame encoder: a camera frame through the model's own processor and vision tower.

One frame becomes one chunk of input embeddings: a short text marker with the
frame's time and camera, the model's image placeholder expanded into one token
per visual token, and the vision tower's output written over those
placeholders exactly as the model's own forward pass does
(``inputs_embeds.masked_scatter(image_token_mask, image_features)``). The
stream then appends the chunk like any other, so frames cost the decoder no
second vision pass and the KV cache holds the visual tokens themselves.

Supported families (the processor and vision-tower APIs differ):

* Qwen2.5-VL: multimodal RoPE. The chunk carries ``rope_positions``
  (``[3, 1, q]``, from the model's own ``get_rope_index`` for the chunk alone,
  starting at 0); the stream shifts them to where the chunk lands. Tokens per
  frame: one per 28x28 pixels after the processor's resize, bounded by
  ``min_pixels``/``max_pixels`` (or set by ``image_size``).
* Idefics3 (SmolVLM-256M/500M): 1-D RoPE, ``rope_positions=None``. Image
  splitting is off: every frame is resized to one ``image_size`` square, which gives
  ``(image_size / patch_size / scale_factor) ** 2`` visual tokens
  (SmolVLM-256M at 512 px: 64).
"""

from __future__ import annotations

import copy
import inspect
import math
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch

from infmllm_ros.engine.types import Chunk

from .frames import FrameError, validate_frame

__all__ = ["VlmEncoder", "SUPPORTED_MODEL_TYPES"]

# Tested families only; Qwen2-VL and SmolVLM2 have near-identical APIs but are not tested here.
_MROPE_TYPES = ("qwen2_5_vl",)
_IDEFICS_TYPES = ("idefics3",)
#: ``config.model_type`` values :class:`VlmEncoder` knows how to feed.
SUPPORTED_MODEL_TYPES = _MROPE_TYPES + _IDEFICS_TYPES

# Qwen's smart_resize refuses frames more elongated than this.
_MAX_ASPECT = 200


def _clock(stamp: Optional[float]) -> str:
    """``HH:MM:SS`` in UTC, the describer's default time format; empty for a missing stamp."""
    if stamp is None or not math.isfinite(stamp):
        return ""
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%H:%M:%S")


def _size_get(size: Any, key: str) -> Optional[int]:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


class VlmEncoder:
    """Encode frames with a VLM's own processor and vision tower into ``inputs_embeds`` chunks.

    Args:
        lm: a :class:`~infmllm_ros.engine.models.LoadedModel` of a supported VLM
            (its ``processor`` set).
        image_size: Qwen: the frame is resized so that its longer side is this
            many pixels (and ``max_pixels`` defaults to ``image_size ** 2``);
            Idefics3: the side of the square each frame is resized to, a
            multiple of ``patch_size * scale_factor``, at most the vision
            tower's own size (default: the processor's ``max_image_size``).
        min_pixels, max_pixels: Qwen only: bounds on the resized frame's area,
            which sets the visual tokens per frame (``pixels / 28**2``).
            Ignored by Idefics3.
        template: the text around the image, with ``{time}`` (UTC
            ``HH:MM:SS``), ``{camera}`` and ``{image}`` (exactly once).

    ``None`` or 0 for ``image_size``, ``min_pixels`` or ``max_pixels`` means
    the processor's default (the node's parameters use 0).

    Example:
        >>> enc = VlmEncoder(lm, max_pixels=112 * 112)  # Qwen2.5-VL: 16 visual tokens per frame
        >>> chunk = enc.encode(frame_rgb, "front", 1700000000.0)
        >>> chunk.inputs_embeds.shape, chunk.rope_positions.shape, chunk.text
        (torch.Size([1, 30, 2048]), torch.Size([3, 1, 30]), '22:13:20 front: <image>\\n')
    """

    name = "vlm"

    def __init__(
        self,
        lm: Any,
        *,
        image_size: Optional[int] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        template: str = "{time} {camera}: {image}\n",
    ) -> None:
        processor = getattr(lm, "processor", None)
        config = getattr(getattr(lm, "model", None), "config", None)
        model_type = getattr(config, "model_type", None)
        if config is None or getattr(config, "vision_config", None) is None:
            raise ValueError(f"the vlm encoder needs a vision-language model; {getattr(lm, 'name', lm)!r} "
                             f"({model_type or type(getattr(lm, 'model', lm)).__name__}) has no vision tower. "
                             "Use encoder type 'offline' for a text-only model.")
        if processor is None:
            raise ValueError(f"the vlm encoder needs the model's processor; {getattr(lm, 'name', lm)!r} was "
                             "loaded without one (load it with infmllm_ros.engine.load_model)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the vlm encoder does not know how to feed a {model_type!r} model; "
                             f"supported: {SUPPORTED_MODEL_TYPES}")
        try:
            template.format(time="", camera="", image="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template may only use {{time}}, {{camera}} and {{image}}: {err}") from None
        if template.count("{image}") != 1:
            raise ValueError("template must contain {image} exactly once")
        for label, value in (("image_size", image_size), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                      or value < 0):
                raise ValueError(f"{label} must be an integer >= 0 (0: the processor's default), got {value!r}")
        # 0 means "the processor's default", as in the node's parameters.
        image_size, min_pixels, max_pixels = (int(v) if v else None for v in (image_size, min_pixels, max_pixels))

        self.lm = lm
        self.model = lm.model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.model_type = model_type
        self.mrope = model_type in _MROPE_TYPES
        self.template = template
        self.image_token_id = int(config.image_token_id)
        self.image_size: Optional[int] = None
        self._images_kwargs: dict[str, Any] = {}
        if self.mrope:
            self._setup_qwen(image_size, min_pixels, max_pixels)
        else:
            self._setup_idefics(image_size)
        self._get_image_features = self._find("get_image_features")
        self._get_rope_index = self._find("get_rope_index") if self.mrope else None

    @classmethod
    def from_model(
        cls,
        lm: Any,
        image_size: Optional[int] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        **ignored: Any,
    ) -> "VlmEncoder":
        """Build from a loaded VLM (raises ``ValueError`` for a text-only model or one without a processor).

        Options meant for other encoders (e.g. the offline encoder's ``template``) are ignored, so callers
        can pass one option set to any encoder.
        """
        del ignored
        return cls(lm, image_size=image_size, min_pixels=min_pixels, max_pixels=max_pixels)

    # -- setup ------------------------------------------------------------------------------------------------

    def _setup_qwen(self, image_size, min_pixels, max_pixels) -> None:
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "size", None)
        low = min_pixels or _size_get(size, "shortest_edge") or getattr(image_processor, "min_pixels", None)
        high = max_pixels or (image_size * image_size if image_size else None)
        high = high or _size_get(size, "longest_edge") or getattr(image_processor, "max_pixels", None)
        if low is None or high is None:
            raise ValueError("could not read min_pixels/max_pixels from the processor; pass both")
        if low > high:
            raise ValueError(f"min_pixels ({low}) is larger than max_pixels ({high})")
        self.min_pixels, self.max_pixels = int(low), int(high)
        self.image_size = image_size
        self._images_kwargs = {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}
        start = self.tokenizer.convert_ids_to_tokens(int(self.config.vision_start_token_id))
        end = self.tokenizer.convert_ids_to_tokens(int(self.config.vision_end_token_id))
        self.placeholder = f"{start}{self.processor.image_token}{end}"

    def _setup_idefics(self, image_size) -> None:
        vision = self.config.vision_config
        patch, scale = int(vision.patch_size), int(self.config.scale_factor)
        native = int(vision.image_size)
        default = _size_get(getattr(self.processor.image_processor, "max_image_size", None), "longest_edge")
        side = int(image_size or default or native)
        step = patch * scale
        if side % step or side > native:
            raise ValueError(f"image_size for this {self.model_type} model must be a multiple of {step} "
                             f"(patch {patch} x scale factor {scale}) and at most {native}, got {side}")
        self.image_size = side
        self.image_seq_len = (side // patch) ** 2 // scale**2
        self._images_kwargs = {"do_image_splitting": False, "size": {"longest_edge": side},
                               "max_image_size": {"longest_edge": side}}
        if getattr(self.processor, "image_seq_len", None) != self.image_seq_len:
            # Idefics3Processor's `image_seq_len` call argument is ignored when it expands <image> (transformers
            # 5.17-5.24 read self.image_seq_len), so give this encoder its own shallow copy with the right value.
            self.processor = copy.copy(self.processor)
            self.processor.image_seq_len = self.image_seq_len
        self.placeholder = self.processor.image_token

    def _find(self, name: str):
        for owner in (self.model, getattr(self.model, "model", None)):
            fn = getattr(owner, name, None) if owner is not None else None
            if callable(fn):
                return fn
        raise ValueError(f"{type(self.model).__name__} has no {name}(); this transformers version is not supported")

    # -- the FrameEncoder API ---------------------------------------------------------------------------------

    def encode(self, frame_rgb: np.ndarray, camera: str, stamp: float) -> Chunk:
        """One frame -> one ``kind="frame"`` chunk of ``inputs_embeds``."""
        return self.encode_batch([frame_rgb], [camera], [stamp])[0]

    def encode_batch(self, frames: Sequence[np.ndarray], cameras: Sequence[str],
                     stamps: Sequence[float]) -> list[Chunk]:
        """Several frames, one vision-tower pass; one chunk per frame, in order."""
        if not (len(frames) == len(cameras) == len(stamps)):
            raise ValueError(f"got {len(frames)} frames, {len(cameras)} cameras and {len(stamps)} stamps")
        if not frames:
            return []
        inputs = self.processor_inputs(frames, cameras, stamps)
        features = self._image_features(inputs)
        chunks = []
        embed = self.model.get_input_embeddings()
        device = self.lm.device
        with torch.no_grad():
            for item, feats, camera, stamp in zip(inputs, features, cameras, stamps):
                ids = item["input_ids"].to(device)
                mask = ids == self.image_token_id
                if int(mask.sum()) != feats.shape[0]:
                    raise RuntimeError(f"the processor wrote {int(mask.sum())} image tokens for a frame whose "
                                       f"features have {feats.shape[0]} rows")
                embeds = embed(ids)
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.device, embeds.dtype))
                positions = self._rope_positions(item) if self.mrope else None
                chunks.append(Chunk(inputs_embeds=embeds, rope_positions=positions, kind="frame", camera=camera,
                                    stamp=None if stamp is None else float(stamp), text=item["text"]))
        return chunks

    # -- the pieces (public so tests and benchmarks can build the model's own un-streamed input) -------------

    def text_for(self, camera: str, stamp: Optional[float]) -> str:
        """The chunk's text with the model's (unexpanded) image placeholder."""
        head, tail = self.template.split("{image}")
        head = head.format(time=_clock(stamp), camera=camera).lstrip(" ")
        tail = tail.format(time=_clock(stamp), camera=camera)
        return f"{head}{self.placeholder}{tail}"

    def prepare_frame(self, frame: np.ndarray) -> np.ndarray:
        """Validate (``FrameError`` if unusable) and resize a frame the way this encoder feeds it."""
        frame = validate_frame(frame)
        height, width = frame.shape[:2]
        if self.mrope:
            if max(height, width) / min(height, width) > _MAX_ASPECT:
                raise FrameError(f"frame of {width}x{height} is too elongated for this model "
                                 f"(aspect ratio above {_MAX_ASPECT})")
            if self.image_size:
                scale = self.image_size / max(height, width)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                frame = self._resize(frame, size)
        elif (height, width) != (self.image_size, self.image_size) and max(height, width) > self.image_size:
            # The processor squashes every frame to one square; do the big downscale here, with area
            # averaging (the processor's Lanczos on a full camera frame costs more and aliases no less).
            frame = self._resize(frame, (self.image_size, self.image_size))
        return frame

    def processor_inputs(self, frames: Sequence[np.ndarray], cameras: Sequence[str],
                         stamps: Sequence[Optional[float]]) -> list[dict]:
        """Run the processor per frame: ``input_ids`` ``[1, q]``, the vision inputs, ``text``."""
        out = []
        for frame, camera, stamp in zip(frames, cameras, stamps):
            frame = self.prepare_frame(frame)
            text = self.text_for(camera, stamp)
            try:
                # channels_last: a tiny frame (1x1x3) would otherwise be guessed as channels-first.
                batch = self.processor(text=[text], images=[frame], return_tensors="pt",
                                       images_kwargs={**self._images_kwargs, "input_data_format": "channels_last"})
            except (ValueError, TypeError) as err:
                height, width = frame.shape[:2]
                raise FrameError(f"the {self.model_type} processor cannot use a {width}x{height} frame: {err}") from err
            item = {key: value for key, value in batch.items()}
            item["text"] = text.replace(self.placeholder, "<image>")
            out.append(item)
        return out

    # -- internals --------------------------------------------------------------------------------------------

    @staticmethod
    def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        shrink = size[0] * size[1] < frame.shape[0] * frame.shape[1]
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def _image_features(self, inputs: list[dict]) -> list[torch.Tensor]:
        """Visual embeddings per frame, ``[tokens, hidden]`` each, from one vision-tower call."""
        device = self.lm.device
        with torch.no_grad():
            if self.mrope:
                grid = torch.cat([item["image_grid_thw"] for item in inputs]).to(device)
                pixels = torch.cat([item["pixel_values"] for item in inputs]).to(device)
                out = self._get_image_features(pixel_values=pixels, image_grid_thw=grid)
                merge = int(self.config.vision_config.spatial_merge_size)
                sizes = (grid.prod(-1) // merge**2).tolist()
            else:
                pixels = torch.cat([item["pixel_values"] for item in inputs]).to(device)
                kwargs = {"pixel_values": pixels}
                if "pixel_attention_mask" in inputs[0]:
                    kwargs["pixel_attention_mask"] = torch.cat([item["pixel_attention_mask"]
                                                                for item in inputs]).to(device)
                out = self._get_image_features(**kwargs)
                sizes = [self.image_seq_len] * len(inputs)
        # transformers 5.x: a ModelOutput whose pooler_output is the projected features (a tensor, or one per
        # image); older versions return the features themselves.
        feats = getattr(out, "pooler_output", None)
        if feats is None:
            feats = out
        hidden = int(self.lm.text_config.hidden_size)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        feats = feats.reshape(-1, hidden)
        if feats.shape[0] != sum(sizes):
            raise RuntimeError(f"the vision tower gave {feats.shape[0]} visual tokens for {len(inputs)} frames, "
                               f"expected {sum(sizes)}")
        return list(torch.split(feats, sizes))

    def _rope_positions(self, item: dict) -> torch.Tensor:
        ids = item["input_ids"]
        kwargs = {"input_ids": ids, "image_grid_thw": item["image_grid_thw"],
                  "attention_mask": torch.ones_like(ids)}
        params = inspect.signature(self._get_rope_index).parameters
        if "mm_token_type_ids" in params:
            kwargs["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
        if "video_grid_thw" in params:
            kwargs["video_grid_thw"] = None
        positions, _ = self._get_rope_index(**kwargs)
        return positions.to(torch.long).cpu()
