"""Turn whatever numpy image a camera, a file or a test hands us into one shape.

Everything downstream (the describer, the encoders, the VLM processors) assumes
a C-contiguous ``uint8`` array of shape ``(H, W, 3)`` in RGB order.
:func:`validate_frame` is the single gate that gets an array there, or raises
:class:`FrameError` saying what was wrong with it. No ROS in this module.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

__all__ = [
    "FrameError",
    "validate_frame",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MAX_PIXELS",
]

#: Frames whose longer side exceeds this are downscaled (keeping the aspect
#: ratio). 4096 keeps 4K cameras at full size while bounding the work a single
#: frame can cost the describer or a vision tower.
DEFAULT_MAX_SIDE = 4096

#: Frames with more pixels than this are refused outright: 100 MP is beyond any
#: camera a robot streams, so such an array is almost certainly a mistake (a
#: wrong reshape, a mosaic), and resizing it would itself cost seconds and GBs.
DEFAULT_MAX_PIXELS = 100_000_000

Uint16Mode = Literal["range", "shift"]


class FrameError(ValueError):
    """The array cannot be read as an image; the message says why."""


def validate_frame(
    arr: np.ndarray,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    uint16_mode: Uint16Mode = "range",
    bgr: bool = False,
) -> np.ndarray:
    """Return ``arr`` as a C-contiguous RGB ``uint8`` array of shape ``(H, W, 3)``.

    Accepted inputs, and what is done with them:

    * ``(H, W)`` or ``(H, W, 1)``: grey, replicated into three channels.
    * ``(H, W, 3)``: taken as RGB (or BGR when ``bgr=True``, as OpenCV gives).
    * ``(H, W, 4)``: RGBA (BGRA when ``bgr=True``); alpha is dropped, not
      composited, because camera drivers use the fourth byte as padding far
      more often than as real transparency, and compositing over black would
      darken valid pixels.
    * ``(C, H, W)`` with ``C`` in 1/3/4 and a last axis that cannot be a
      channel count: channel-first (torch) layout, transposed.
    * ``(1, H, W, C)``: a batch of one, squeezed.
    * ``uint8``: as is. ``bool``: 0/255.
    * ``uint16``: see ``uint16_mode``.
    * float: values in ``[0, 1]`` are scaled by 255; values in ``(1, 255]``
      are taken as already on the 0..255 scale. NaN, inf, or values outside
      ``[0, 255]`` raise.
    * other integer types: accepted when every value lies in 0..255.

    Args:
        arr: the image.
        max_side: a frame whose longer side is larger is downscaled (area
            interpolation) so that its longer side equals this.
        max_pixels: a frame with more pixels than this raises instead; the
            check runs before any conversion so a bogus array costs nothing.
        uint16_mode: ``"range"`` (default) stretches the frame's actual
            min..max to 0..255. 16-bit sources on robots are mostly depth,
            thermal or 10/12-bit sensors whose values fill a small slice of
            0..65535, and ``>> 8`` would show them nearly black. The price is
            that brightness is no longer comparable between frames.
            ``"shift"`` keeps the high byte (``>> 8``), right for true
            full-scale 16-bit cameras where steady brightness matters.
        bgr: the three or four colour channels are in BGR(A) order.

    Returns:
        A C-contiguous ``uint8`` array ``(H, W, 3)``, RGB. When ``arr`` already
        is one (and needs no resize) it is returned as is, without a copy.

    Raises:
        FrameError: the array is empty, has an unusable shape, channel count
            or dtype, holds NaN/inf or out-of-range values, or is too large.
    """
    if not isinstance(arr, np.ndarray):
        raise FrameError(f"expected a numpy array, got {type(arr).__name__}")
    if max_side < 1 or max_pixels < 1:
        raise FrameError(f"max_side and max_pixels must be positive, got {max_side} and {max_pixels}")
    if uint16_mode not in ("range", "shift"):
        raise FrameError(f"uint16_mode must be 'range' or 'shift', got {uint16_mode!r}")

    img = _to_hwc(arr)
    height, width, channels = img.shape
    if height * width > max_pixels:
        raise FrameError(
            f"frame of {width}x{height} ({height * width / 1e6:.1f} MP) exceeds the limit of "
            f"{max_pixels / 1e6:.1f} MP; this is almost certainly not a camera frame"
        )

    img = _to_uint8(img, uint16_mode)

    if channels == 4:
        img = img[:, :, :3]  # drop alpha; see docstring for why not composite
    if bgr and channels >= 3:
        img = img[:, :, ::-1]

    if max(height, width) > max_side:
        factor = max_side / max(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        # INTER_AREA averages the source pixels each output pixel covers, so a
        # large downscale does not alias the way nearest/linear would.
        img = cv2.resize(np.ascontiguousarray(img), size, interpolation=cv2.INTER_AREA)
        if img.ndim == 2:
            img = img[:, :, None]

    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def _to_hwc(arr: np.ndarray) -> np.ndarray:
    """Reshape to ``(H, W, C)`` with C in 1/3/4, or raise."""
    if arr.size == 0:
        raise FrameError(f"empty frame: shape {arr.shape} has no pixels")
    shape = arr.shape
    if arr.ndim == 4:
        if shape[0] != 1:
            raise FrameError(f"got a batch of {shape[0]} frames (shape {shape}); pass one frame at a time")
        arr = arr[0]
        shape = arr.shape
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise FrameError(f"a frame needs 2 (H, W) or 3 (H, W, C) dimensions, got {arr.ndim} with shape {shape}")
    if shape[2] in (1, 3, 4):
        return arr
    if shape[0] in (1, 3, 4):
        # The last axis cannot be channels, the first can: channel-first layout.
        return np.transpose(arr, (1, 2, 0))
    raise FrameError(
        f"unsupported channel count {shape[2]} (shape {shape}); expected 1 (grey), 3 (RGB) or 4 (RGBA)"
    )


def _to_uint8(img: np.ndarray, uint16_mode: Uint16Mode) -> np.ndarray:
    """Convert the dtype to ``uint8`` following the rules in :func:`validate_frame`."""
    dtype = img.dtype
    if dtype == np.uint8:
        return img
    if dtype == np.bool_:
        return img.astype(np.uint8) * np.uint8(255)
    if dtype == np.uint16:
        if uint16_mode == "shift":
            return (img >> 8).astype(np.uint8)
        low, high = int(img.min()), int(img.max())
        if high == low:
            # A flat frame has no range to stretch; keep its level on the
            # 16-bit scale rather than inventing contrast.
            return np.full(img.shape, high >> 8, dtype=np.uint8)
        scaled = (img.astype(np.float32) - low) * (255.0 / (high - low))
        return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(img).all():
            raise FrameError("float frame contains NaN or inf values")
        low, high = float(img.min()), float(img.max())
        if low < 0.0 or high > 255.0:
            raise FrameError(
                f"float frame values span [{low:.3g}, {high:.3g}]; expected [0, 1] (or [0, 255])"
            )
        factor = 255.0 if high <= 1.0 else 1.0
        return np.clip(img.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        low, high = int(img.min()), int(img.max())
        if low < 0 or high > 255:
            raise FrameError(
                f"{dtype} frame values span [{low}, {high}]; only 0..255 can be read as 8-bit "
                "(convert 16-bit data to uint16 first)"
            )
        return img.astype(np.uint8)
    raise FrameError(f"unsupported pixel type {dtype}; expected uint8, uint16, float or bool")
