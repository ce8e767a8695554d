"""sensor_msgs Image / CompressedImage <-> RGB uint8 numpy, without cv_bridge.

The one place that converts images. It works on any object with the messages'
attributes (duck typing), so rclpy messages and the ones ``rosbags`` reads from
a bag go through the same code. Nothing here imports rclpy at module level:
only the ``*_msg`` builders import ``sensor_msgs`` (inside the functions), so
the conversion to numpy works where ROS is not installed.

Why not ``rosbags.image.message_to_cvimage``: it builds the array from
``(height, width)`` and ignores ``step``, so a frame with row padding (drivers
align rows to 4, 16 or 64 bytes) comes out sheared, and it asserts on corrupt
compressed data instead of raising. The conversions here are a few lines of
numpy and OpenCV each and check what they read.

Why not cv_bridge by default: ROS 2's cv_bridge is not on PyPI; when it is
importable it is used only for encodings this module does not know.

Raw encodings: rgb8, bgr8, rgba8, bgra8, mono8, mono16, 8UC1, 8UC3 (BGR, as
OpenCV writes it), 8UC4 (BGRA), 16UC1, rgb16, bgr16, rgba16, bgra16, 32FC1,
bayer_{rggb,bggr,gbrg,grbg}{8,16}, yuv422/uyvy, yuv422_yuy2/yuyv, nv12, nv21.
Compressed: whatever OpenCV decodes (jpeg, png, ...), including
``compressedDepth`` PNGs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import cv2
import numpy as np

from infmllm_ros.perception.frames import DEFAULT_MAX_PIXELS, FrameError, validate_frame

__all__ = [
    "ImageConversionError",
    "RAW_ENCODINGS",
    "image_msg_to_rgb",
    "image_to_rgb",
    "compressed_to_rgb",
    "is_compressed",
    "rgb_to_image_msg",
    "rgb_to_compressed_msg",
    "encode_compressed",
    "to_rclpy_image",
    "stamp_to_seconds",
]


class ImageConversionError(ValueError):
    """The message cannot be turned into an RGB image; the message says why."""


# -- raw encodings ---------------------------------------------------------------

_Convert = Callable[[np.ndarray], np.ndarray]


def _colour(code: int) -> _Convert:
    return lambda a: cv2.cvtColor(a, code)


def _keep(a: np.ndarray) -> np.ndarray:
    return a


def _shift16(convert: _Convert) -> _Convert:
    """16-bit colour -> 8-bit by the high byte (steady brightness from frame to frame)."""
    return lambda a: convert((a >> 8).astype(np.uint8))


def _depth_float(a: np.ndarray) -> np.ndarray:
    """32FC1 (depth in metres, NaN for no return) -> grey by the finite range."""
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    low, high = float(a[finite].min()), float(a[finite].max())
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.where(finite, (a - low) * scale, 0.0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# encoding -> (element dtype, channels per pixel as stored, conversion to RGB /
# grey / uint16 grey that validate_frame finishes). OpenCV names Bayer patterns
# by the second row's second and third pixel, so ROS's rggb is OpenCV's BG
# (checked against a synthetic mosaic in the tests).
RAW_ENCODINGS: dict[str, tuple[np.dtype, int, _Convert]] = {
    "rgb8": (np.dtype(np.uint8), 3, _keep),
    "bgr8": (np.dtype(np.uint8), 3, _colour(cv2.COLOR_BGR2RGB)),
    "rgba8": (np.dtype(np.uint8), 4, _colour(cv2.COLOR_RGBA2RGB)),
    "bgra8": (np.dtype(np.uint8), 4, _colour(cv2.COLOR_BGRA2RGB)),
    "mono8": (np.dtype(np.uint8), 1, _keep),
    "8UC1": (np.dtype(np.uint8), 1, _keep),
    "8UC3": (np.dtype(np.uint8), 3, _colour(cv2.COLOR_BGR2RGB)),
    "8UC4": (np.dtype(np.uint8), 4, _colour(cv2.COLOR_BGRA2RGB)),
    "mono16": (np.dtype(np.uint16), 1, _keep),
    "16UC1": (np.dtype(np.uint16), 1, _keep),
    "rgb16": (np.dtype(np.uint16), 3, _shift16(_keep)),
    "bgr16": (np.dtype(np.uint16), 3, _shift16(_colour(cv2.COLOR_BGR2RGB))),
    "rgba16": (np.dtype(np.uint16), 4, _shift16(_colour(cv2.COLOR_RGBA2RGB))),
    "bgra16": (np.dtype(np.uint16), 4, _shift16(_colour(cv2.COLOR_BGRA2RGB))),
    "32FC1": (np.dtype(np.float32), 1, _depth_float),
    "bayer_rggb8": (np.dtype(np.uint8), 1, _colour(cv2.COLOR_BayerBG2RGB)),
    "bayer_bggr8": (np.dtype(np.uint8), 1, _colour(cv2.COLOR_BayerRG2RGB)),
    "bayer_gbrg8": (np.dtype(np.uint8), 1, _colour(cv2.COLOR_BayerGR2RGB)),
    "bayer_grbg8": (np.dtype(np.uint8), 1, _colour(cv2.COLOR_BayerGB2RGB)),
    "bayer_rggb16": (np.dtype(np.uint16), 1, _shift16(_colour(cv2.COLOR_BayerBG2RGB))),
    "bayer_bggr16": (np.dtype(np.uint16), 1, _shift16(_colour(cv2.COLOR_BayerRG2RGB))),
    "bayer_gbrg16": (np.dtype(np.uint16), 1, _shift16(_colour(cv2.COLOR_BayerGR2RGB))),
    "bayer_grbg16": (np.dtype(np.uint16), 1, _shift16(_colour(cv2.COLOR_BayerGB2RGB))),
    # ROS's "yuv422" is UYVY byte order; "yuv422_yuy2" is YUYV.
    "yuv422": (np.dtype(np.uint8), 2, _colour(cv2.COLOR_YUV2RGB_UYVY)),
    "uyvy": (np.dtype(np.uint8), 2, _colour(cv2.COLOR_YUV2RGB_UYVY)),
    "yuv422_yuy2": (np.dtype(np.uint8), 2, _colour(cv2.COLOR_YUV2RGB_YUY2)),
    "yuyv": (np.dtype(np.uint8), 2, _colour(cv2.COLOR_YUV2RGB_YUY2)),
}

# Planar 4:2:0 formats: a full-size Y plane followed by a half-height UV plane.
_PLANAR_420 = {"nv12": cv2.COLOR_YUV2RGB_NV12, "nv21": cv2.COLOR_YUV2RGB_NV21}


def is_compressed(msg: Any) -> bool:
    """True for a CompressedImage (it has ``format`` and no ``encoding``)."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def image_msg_to_rgb(msg: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, uint16_mode: str = "range") -> np.ndarray:
    """Image or CompressedImage (rclpy or rosbags) -> C-contiguous RGB ``uint8`` ``(H, W, 3)``.

    Args:
        msg: the message; anything with Image's or CompressedImage's fields.
        max_pixels: larger frames raise before any pixel is converted.
        uint16_mode: how 16-bit grey (mono16, 16UC1, PNG depth) becomes 8-bit:
            ``"range"`` stretches the frame's min..max, ``"shift"`` keeps the
            high byte (see :func:`validate_frame`).

    Raises:
        ImageConversionError: unknown encoding, size/step mismatch, zero size,
            corrupt compressed data, or a frame that is too large.
    """
    if is_compressed(msg):
        return compressed_to_rgb(msg, max_pixels=max_pixels, uint16_mode=uint16_mode)
    return image_to_rgb(msg, max_pixels=max_pixels, uint16_mode=uint16_mode)


def image_to_rgb(msg: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, uint16_mode: str = "range") -> np.ndarray:
    """sensor_msgs/Image -> RGB ``uint8``; see :func:`image_msg_to_rgb`."""
    try:
        height, width, step = int(msg.height), int(msg.width), int(msg.step)
        encoding = str(msg.encoding)
        big_endian = bool(msg.is_bigendian)
        data = msg.data
    except AttributeError as err:
        raise ImageConversionError(f"not a sensor_msgs/Image: {err}") from None
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"empty image: {width}x{height} ({encoding!r})")
    if height * width > max_pixels:
        raise ImageConversionError(f"image of {width}x{height} exceeds the limit of {max_pixels / 1e6:.1f} MP")
    buffer = _as_bytes_array(data)

    key = encoding if encoding in RAW_ENCODINGS or encoding in _PLANAR_420 else encoding.lower()
    if key in _PLANAR_420:
        rows = height + height // 2
        planes = _rows(buffer, rows, width, step, np.dtype(np.uint8), 1, False, encoding)
        if height % 2 or width % 2:
            raise ImageConversionError(f"{encoding} needs even width and height, got {width}x{height}")
        return _finish(cv2.cvtColor(planes[:, :, 0], _PLANAR_420[key]), max_pixels, uint16_mode)
    if key not in RAW_ENCODINGS:
        converted = _try_cv_bridge(msg)
        if converted is not None:
            return _finish(converted, max_pixels, uint16_mode)
        known = ", ".join(sorted(RAW_ENCODINGS) + sorted(_PLANAR_420))
        raise ImageConversionError(f"unsupported image encoding {encoding!r}; supported: {known}")
    dtype, channels, convert = RAW_ENCODINGS[key]
    if channels == 2 and width % 2:
        raise ImageConversionError(f"{encoding} packs pixel pairs and needs an even width, got {width}")
    pixels = _rows(buffer, height, width, step, dtype, channels, big_endian, encoding)
    if channels == 1:
        pixels = pixels[:, :, 0]
    try:
        rgb = convert(np.ascontiguousarray(pixels))
    except cv2.error as err:
        raise ImageConversionError(f"OpenCV could not convert {encoding} {width}x{height}: {err}") from None
    return _finish(rgb, max_pixels, uint16_mode)


def compressed_to_rgb(msg: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, uint16_mode: str = "range") -> np.ndarray:
    """sensor_msgs/CompressedImage -> RGB ``uint8``; see :func:`image_msg_to_rgb`."""
    try:
        fmt = str(msg.format)
        data = msg.data
    except AttributeError as err:
        raise ImageConversionError(f"not a sensor_msgs/CompressedImage: {err}") from None
    buffer = _as_bytes_array(data)
    if buffer.size == 0:
        raise ImageConversionError(f"empty compressed image (format {fmt!r})")
    if "compresseddepth" in fmt.lower():
        # compressed_depth_image_transport puts a small config header before the PNG.
        start = bytes(buffer[:64]).find(b"\x89PNG")
        if start > 0:
            buffer = buffer[start:]
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise ImageConversionError(f"corrupt compressed image (format {fmt!r}, {buffer.size} bytes): {err}") from None
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(
            f"corrupt or undecodable compressed image (format {fmt!r}, {buffer.size} bytes)"
        )
    if decoded.shape[0] * decoded.shape[1] > max_pixels:
        raise ImageConversionError(
            f"image of {decoded.shape[1]}x{decoded.shape[0]} exceeds the limit of {max_pixels / 1e6:.1f} MP"
        )
    # imdecode returns OpenCV's channel order (BGR / BGRA), whatever the format
    # string says the source order was.
    return _finish(decoded, max_pixels, uint16_mode, bgr=decoded.ndim == 3)


def _finish(img: np.ndarray, max_pixels: int, uint16_mode: str, bgr: bool = False) -> np.ndarray:
    try:
        return validate_frame(img, max_pixels=max_pixels, uint16_mode=uint16_mode, bgr=bgr)
    except FrameError as err:
        raise ImageConversionError(str(err)) from None


def _as_bytes_array(data: Any) -> np.ndarray:
    """The message's ``data`` (bytes, array.array, numpy, list, memoryview) as a flat uint8 array."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, (list, tuple)):
        try:
            return np.asarray(data, dtype=np.uint8)
        except (ValueError, OverflowError, TypeError) as err:
            raise ImageConversionError(f"image data is not a byte sequence: {err}") from None
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError as err:
        raise ImageConversionError(f"image data of type {type(data).__name__} is not a byte buffer") from err


def _rows(
    buffer: np.ndarray,
    height: int,
    width: int,
    step: int,
    dtype: np.dtype,
    channels: int,
    big_endian: bool,
    encoding: str,
) -> np.ndarray:
    """View ``buffer`` as ``(height, width, channels)`` honouring ``step`` (row padding) and byte order."""
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is shorter than one row of {width} px {encoding} ({row_bytes} bytes)"
        )
    if buffer.size != step * height:
        raise ImageConversionError(
            f"data holds {buffer.size} bytes but {width}x{height} {encoding} with step {step} "
            f"needs step*height = {step * height}"
        )
    rows = buffer.reshape(height, step)[:, :row_bytes]
    order = ">" if big_endian else "<"
    pixels = np.ascontiguousarray(rows).view(dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype)
    pixels = pixels.reshape(height, width, channels)
    if dtype.itemsize > 1:
        pixels = pixels.astype(dtype.newbyteorder("="))  # native order for OpenCV
    return pixels


def _try_cv_bridge(msg: Any) -> Optional[np.ndarray]:
    """cv_bridge's conversion for an encoding we do not know, when cv_bridge is there and works."""
    try:
        from cv_bridge import CvBridge  # type: ignore[import-not-found]
    except Exception:  # not installed, or the ROS 1 build that breaks on numpy 2
        return None
    try:
        return CvBridge().imgmsg_to_cv2(msg, desired_encoding="rgb8")
    except Exception:
        return None


# -- building messages -------------------------------------------------------------

Stamp = Union[None, float, int, tuple, Any]


def stamp_to_seconds(stamp: Any) -> float:
    """``builtin_interfaces/Time`` (or anything with sec/nanosec) -> float seconds."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def _time_msg(stamp: Stamp):
    from builtin_interfaces.msg import Time

    if stamp is None:
        return Time()
    if isinstance(stamp, tuple):
        sec, nanosec = stamp
        return Time(sec=int(sec), nanosec=int(nanosec))
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return Time(sec=int(stamp.sec), nanosec=int(stamp.nanosec))
    if isinstance(stamp, int):
        return Time(sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000)  # int: nanoseconds
    seconds = float(stamp)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"stamp must be a finite non-negative time, got {stamp!r}")
    sec = int(math.floor(seconds))
    nanosec = int(round((seconds - sec) * 1e9))
    if nanosec >= 1_000_000_000:  # rounding carried into the next second
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return Time(sec=sec, nanosec=nanosec)


def rgb_to_image_msg(rgb: np.ndarray, stamp: Stamp = None, frame_id: str = "", encoding: str = "rgb8"):
    """RGB ``uint8`` ``(H, W, 3)`` -> ``sensor_msgs.msg.Image`` (rgb8, bgr8 or mono8).

    ``stamp`` is float seconds, int nanoseconds, ``(sec, nanosec)`` or a
    ``builtin_interfaces/Time``; ``None`` leaves it zero.
    """
    from sensor_msgs.msg import Image

    frame = validate_frame(rgb)
    if encoding == "rgb8":
        pixels = frame
    elif encoding == "bgr8":
        pixels = np.ascontiguousarray(frame[:, :, ::-1])
    elif encoding == "mono8":
        pixels = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"rgb_to_image_msg writes rgb8, bgr8 or mono8, not {encoding!r}")
    msg = Image()
    msg.header.stamp = _time_msg(stamp)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.strides[0])
    msg.data = pixels.tobytes()
    return msg


def rgb_to_compressed_msg(
    rgb: np.ndarray, stamp: Stamp = None, frame_id: str = "", format: str = "jpeg", quality: int = 90
):
    """RGB ``uint8`` ``(H, W, 3)`` -> ``sensor_msgs.msg.CompressedImage`` (jpeg or png)."""
    from sensor_msgs.msg import CompressedImage

    data = encode_compressed(rgb, format=format, quality=quality)
    msg = CompressedImage()
    msg.header.stamp = _time_msg(stamp)
    msg.header.frame_id = frame_id
    msg.format = format
    msg.data = data
    return msg


def encode_compressed(rgb: np.ndarray, format: str = "jpeg", quality: int = 90) -> bytes:
    """RGB ``uint8`` -> jpeg/png bytes, as a CompressedImage carries them (no ROS needed)."""
    frame = validate_frame(rgb)
    fmt = format.lower()
    if fmt in ("jpeg", "jpg"):
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == "png":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]
    else:
        raise ValueError(f"compressed format must be 'jpeg' or 'png', not {format!r}")
    ok, encoded = cv2.imencode(ext, frame[:, :, ::-1], params)  # OpenCV encodes BGR
    if not ok:
        raise ImageConversionError(f"OpenCV could not encode a {frame.shape[1]}x{frame.shape[0]} {fmt}")
    return encoded.tobytes()


def to_rclpy_image(msg: Any):
    """Copy a duck-typed Image/CompressedImage (e.g. from ``rosbags``) into the rclpy message.

    Header stamp and frame_id are kept; pixel data is copied as bytes.
    """
    from sensor_msgs.msg import CompressedImage, Image

    header = msg.header
    if is_compressed(msg):
        out = CompressedImage()
        out.format = str(msg.format)
    else:
        out = Image()
        out.height, out.width = int(msg.height), int(msg.width)
        out.encoding = str(msg.encoding)
        out.is_bigendian = int(msg.is_bigendian)
        out.step = int(msg.step)
    out.header.stamp = _time_msg((int(header.stamp.sec), int(header.stamp.nanosec)))
    out.header.frame_id = str(header.frame_id)
    out.data = _as_bytes_array(msg.data).tobytes()
    return out
