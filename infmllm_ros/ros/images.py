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
Compressed: whatever OpenCV decodes (jpeg, png, tiff ...), with the channel
order the ``format`` string gives (image_transport's compressed plugin rules),
and compressed_depth_image_transport's ``compressedDepth`` png and rvl.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
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
    "CompressedFormat",
    "parse_compressed_format",
    "decode_rvl",
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
    """sensor_msgs/CompressedImage -> RGB ``uint8``; see :func:`image_msg_to_rgb`.

    ``format`` is read as image_transport's plugins write it (see
    :func:`parse_compressed_format`): ``"<encoding>; <codec> compressed <layout>"``
    (compressed_image_transport), ``"<encoding>; compressedDepth <png|rvl>"``
    (compressed_depth_image_transport) or a bare codec name (``jpeg``, ``png``),
    which means OpenCV's own channel order (BGR).
    """
    try:
        fmt = str(msg.format)
        data = msg.data
    except AttributeError as err:
        raise ImageConversionError(f"not a sensor_msgs/CompressedImage: {err}") from None
    buffer = _as_bytes_array(data)
    if buffer.size == 0:
        raise ImageConversionError(f"empty compressed image (format {fmt!r})")
    spec = parse_compressed_format(fmt)
    if spec.depth:
        return _compressed_depth_to_rgb(spec, buffer, max_pixels, uint16_mode)
    decoded = _imdecode(buffer, fmt, max_pixels)
    return _finish(_decoded_to_rgb(spec, decoded), max_pixels, uint16_mode)


@dataclass(frozen=True)
class CompressedFormat:
    """What a ``CompressedImage.format`` string says about its bytes.

    Attributes:
        encoding: the raw image's encoding before compression (the part before
            ``;``); empty for a bare codec name.
        codec: ``jpeg``, ``png``, ``tiff``, ``rvl`` ... (lower case).
        bgr: colour channels are in OpenCV's BGR order (``compressed bgr8``,
            ``compressed bgr16`` or a bare codec name); otherwise a colour
            encoding's bytes are RGB, as compressed_image_transport's
            subscriber assumes.
        depth: compressed_depth_image_transport's format (12-byte header + PNG/RVL).
    """

    encoding: str
    codec: str
    bgr: bool
    depth: bool = False


#: Encodings sensor_msgs::image_encodings::isColor() calls colour: only these
#: get a channel-order decision; any other encoding's bytes are its own layout.
_COLOUR_ENCODINGS = frozenset(f"{order}{bits}" for order in ("rgb", "bgr", "rgba", "bgra")
                              for bits in (8, 16))


def parse_compressed_format(fmt: str) -> CompressedFormat:
    """Parse ``CompressedImage.format`` by image_transport's compressed plugins' rules.

    Format strings the plugins write (image_transport_plugins, ROS 1 and 2):

    * ``"<enc>; jpeg compressed bgr8"``, ``"<enc>; png compressed bgr8|bgr16"``:
      a colour image converted to BGR before compression;
    * ``"mono8; jpeg compressed mono8"``, ``"mono16; png compressed "``: grey,
      nothing after ``compressed`` for an image passed through as is;
    * ``"32FC1; tiff compressed "``;
    * ``"<enc>; compressedDepth png|rvl"`` (or ``"<enc>; compressedDepth"``: png);
    * a bare ``"jpeg"`` / ``"png"`` (older publishers, ``rosbag`` tools): OpenCV's BGR.

    Following compressed_image_transport's subscriber, a colour encoding's
    bytes are BGR only when the part after ``;`` contains ``compressed bgr``
    (or the format is bare); otherwise they are RGB (so
    ``"rgb8; jpeg compressed rgb8"`` keeps its order).

    Raises:
        ImageConversionError: a compressedDepth codec other than png or rvl.
    """
    text = fmt.strip()
    if ";" not in text:
        words = text.lower().split()
        if words and words[0] == "compresseddepth":  # very old depth publishers: png
            return CompressedFormat("", words[1] if len(words) > 1 else "png", False, True)
        return CompressedFormat("", words[0] if words else "", True)
    encoding, rest = (part.strip() for part in text.split(";", 1))
    words = rest.split()
    if words and words[0].lower() == "compresseddepth":
        codec = words[1].lower() if len(words) > 1 else "png"
        if codec not in ("png", "rvl"):
            raise ImageConversionError(
                f"unsupported compressedDepth codec {codec!r} in format {fmt!r}: png and rvl are supported")
        return CompressedFormat(encoding, codec, False, True)
    codec = words[0].lower() if words else ""
    return CompressedFormat(encoding, codec, "compressed bgr" in rest.lower())


def _imdecode(buffer: np.ndarray, fmt: str, max_pixels: int) -> np.ndarray:
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
    return decoded


def _decoded_to_rgb(spec: CompressedFormat, decoded: np.ndarray) -> np.ndarray:
    """imdecode's array (exactly the array the publisher encoded) -> RGB / grey for _finish."""
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    bits = "16" if decoded.dtype == np.uint16 else "8"
    if spec.encoding in _COLOUR_ENCODINGS or not spec.encoding:
        if channels == 1:
            layout = "mono" + bits
        else:
            layout = ("bgr" if spec.bgr else "rgb") + ("a" if channels == 4 else "") + bits
    else:
        # Not a colour encoding: the publisher passed the image through unchanged
        # (mono, bayer, 8UC3 ...), except that jpeg holds 8 bits of a 16-bit one.
        layout = re.sub(r"(8|16)$", bits, spec.encoding)
    entry = RAW_ENCODINGS.get(layout)
    if entry is not None and entry[0] == decoded.dtype and entry[1] == channels:
        try:
            return entry[2](np.ascontiguousarray(decoded if channels > 1 else decoded.reshape(decoded.shape[:2])))
        except cv2.error as err:
            raise ImageConversionError(f"OpenCV could not convert {layout} {decoded.shape}: {err}") from None
    if decoded.dtype == np.float32 and channels == 1:  # e.g. "32FC1; tiff compressed "
        return _depth_float(decoded.reshape(decoded.shape[:2]))
    if channels == 3:  # an encoding we do not know: OpenCV's order
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    return decoded


# compressed_depth_image_transport's ConfigHeader (compression_common.h): the
# compressionFormat enum (int, INV_DEPTH = 0) and float depthParam[2] (the
# quantisation parameters a, b), in the publisher's byte order (little endian
# on every platform ROS 2 ships for).
_DEPTH_HEADER = struct.Struct("<iff")
_INV_DEPTH = 0


def _compressed_depth_to_rgb(spec: CompressedFormat, buffer: np.ndarray, max_pixels: int,
                             uint16_mode: str) -> np.ndarray:
    """compressed_depth_image_transport -> RGB, as the raw depth image of the same depth would give.

    Layout: a 12-byte header (format enum, a, b), then a 16-bit PNG or an RVL
    stream (``uint32 cols, uint32 rows``, then RVL words). For 32-bit depth the
    16-bit values ``q`` are quantised inverse depth: ``depth = a / (q - b)``,
    ``q = 0`` means no return (NaN). 16-bit depth (16UC1 / mono16, millimetres)
    is stored as is.
    """
    encoding = spec.encoding or "32FC1"  # headerless format strings came from 32FC1 publishers
    if encoding not in ("32FC1", "16UC1", "mono16"):
        raise ImageConversionError(
            f"unsupported compressedDepth image encoding {encoding!r}: 32FC1, 16UC1 and mono16 are supported")
    header = _DEPTH_HEADER.size
    if buffer.size <= header:
        raise ImageConversionError(
            f"compressedDepth image of {buffer.size} bytes is shorter than its {header}-byte header")
    kind, a, b = _DEPTH_HEADER.unpack(bytes(buffer[:header]))
    body = buffer[header:]
    if spec.codec == "rvl":
        q = decode_rvl(body, max_pixels=max_pixels)
    else:
        if bytes(body[:8]) != b"\x89PNG\r\n\x1a\n":
            raise ImageConversionError(
                f"corrupt compressedDepth png: no PNG after the {header}-byte header ({buffer.size} bytes)")
        q = _imdecode(body, f"{encoding}; compressedDepth png", max_pixels)
    if q.ndim != 2 or q.dtype != np.uint16:
        raise ImageConversionError(f"compressedDepth holds {q.dtype} {q.shape}, not a 16-bit single-channel image")
    if encoding != "32FC1":
        return _finish(q, max_pixels, uint16_mode)
    if kind != _INV_DEPTH or not (math.isfinite(a) and math.isfinite(b)) or a == 0:
        raise ImageConversionError(
            f"corrupt compressedDepth header: format {kind}, quantisation a={a!r}, b={b!r}")
    qf = q.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(q > 0, np.float32(a) / (qf - np.float32(b)), np.float32("nan")).astype(np.float32)
    return _finish(RAW_ENCODINGS["32FC1"][2](depth), max_pixels, uint16_mode)


def decode_rvl(data: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode compressed_depth_image_transport's RVL payload -> ``uint16`` ``(rows, cols)``.

    RVL (A. D. Wilson, "Fast Lossless Depth Image Compression", ISS 2017):
    little-endian ``uint32 cols, uint32 rows``, then 32-bit words read from
    their most significant nibble down. Each value is a variable-length code of
    3-bit groups (low first; a set fourth bit means more follow). Values come
    as: a run of zeros, a run of non-zeros, then one zigzag-coded delta per
    non-zero pixel, each delta from the previous non-zero pixel (starting at 0).

    Raises:
        ImageConversionError: a zero or too large size, or a stream that ends
            early or describes more pixels than the image has.
    """
    buf = _as_bytes_array(data)
    if buf.size < 8:
        raise ImageConversionError(f"RVL data of {buf.size} bytes is shorter than its 8-byte size header")
    cols, rows = struct.unpack("<II", bytes(buf[:8]))
    n = cols * rows
    if n == 0:
        raise ImageConversionError(f"RVL image of {cols}x{rows} has no pixel")
    if n > max_pixels:
        raise ImageConversionError(f"RVL image of {cols}x{rows} exceeds the limit of {max_pixels / 1e6:.1f} MP")
    words_bytes = buf[8:]
    words_bytes = words_bytes[: words_bytes.size - words_bytes.size % 4]
    words = np.frombuffer(words_bytes.tobytes(), dtype="<u4").astype(np.uint32)
    nibbles = ((words[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 0xF).reshape(-1)
    ends = (nibbles & 0x8) == 0
    if not ends.any():
        raise ImageConversionError("truncated RVL data: no complete value")
    last = int(np.flatnonzero(ends)[-1]) + 1
    nibbles, ends = nibbles[:last], ends[:last]
    starts = np.concatenate(([0], np.flatnonzero(ends)[:-1] + 1))
    group = np.repeat(np.arange(starts.size), np.diff(np.concatenate((starts, [last]))))
    shift = 3 * (np.arange(last) - starts[group])
    if shift.max(initial=0) > 60:
        raise ImageConversionError("corrupt RVL data: a value longer than 64 bits")
    values = np.add.reduceat((nibbles & 0x7).astype(np.int64) << shift.astype(np.int64), starts)

    # Walk the runs (one Python step per run, not per pixel).
    mask_runs, delta_slices = [], []
    i, done, count = 0, 0, values.size
    while done < n:
        if i + 2 > count:
            raise ImageConversionError(f"truncated RVL data: {done} of {n} pixels decoded")
        zeros, nonzeros = int(values[i]), int(values[i + 1])
        done += zeros + nonzeros
        if done > n:
            raise ImageConversionError(f"corrupt RVL data: runs describe more than the {n} pixels of {cols}x{rows}")
        if i + 2 + nonzeros > count:
            raise ImageConversionError(f"truncated RVL data: {done - nonzeros} of {n} pixels decoded")
        mask_runs.extend((zeros, nonzeros))
        delta_slices.append((i + 2, i + 2 + nonzeros))
        i += 2 + nonzeros
    positive = np.concatenate([values[a:b] for a, b in delta_slices]) if delta_slices else np.zeros(0, np.int64)
    deltas = (positive >> 1) ^ -(positive & 1)  # zigzag
    out = np.zeros(n, np.uint16)
    nonzero = np.repeat(np.tile([False, True], len(mask_runs) // 2), mask_runs)
    out[nonzero] = (np.cumsum(deltas) & 0xFFFF).astype(np.uint16)
    return out.reshape(rows, cols)


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
