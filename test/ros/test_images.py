"""images.py: sensor_msgs Image / CompressedImage (rclpy, rosbags or duck-typed) -> RGB uint8."""

from types import SimpleNamespace

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from infmllm_ros.ros.images import (  # noqa: E402
    ImageConversionError,
    encode_compressed,
    image_msg_to_rgb,
    is_compressed,
)


def _rgb(h=6, w=8):
    """A frame whose three channels all differ, so channel-order slips show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 30 + 5, y * 40 + 3, 250 - x * 20], axis=-1).astype(np.uint8)


def _raw(pixels: np.ndarray, encoding: str, step_padding: int = 0, big_endian: bool = False, fill: int = 0xAB):
    """A duck-typed sensor_msgs/Image whose rows may carry padding bytes (filled with junk)."""
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1).view(np.uint8) if pixels.dtype.itemsize > 1 else pixels.reshape(h, -1)
    if pixels.dtype.itemsize > 1:
        swapped = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<"))
        row = np.ascontiguousarray(swapped).reshape(h, -1).view(np.uint8)
    padded = np.full((h, row.shape[1] + step_padding), fill, np.uint8)
    padded[:, : row.shape[1]] = row
    return SimpleNamespace(
        height=h, width=w, encoding=encoding, is_bigendian=int(big_endian), step=padded.shape[1],
        data=padded.tobytes(), header=SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=2), frame_id="cam"),
    )


@pytest.mark.parametrize(
    "encoding, make",
    [
        ("rgb8", lambda rgb: rgb),
        ("bgr8", lambda rgb: rgb[:, :, ::-1]),
        ("8UC3", lambda rgb: rgb[:, :, ::-1]),  # OpenCV's order, as cv_bridge reads 8UC3
        ("rgba8", lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])),
        ("bgra8", lambda rgb: np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 9, np.uint8)])),
    ],
)
@pytest.mark.parametrize("padding", [0, 5])
def test_colour_encodings_decode_exactly_even_with_row_padding(encoding, make, padding):
    rgb = _rgb()
    out = image_msg_to_rgb(_raw(np.ascontiguousarray(make(rgb)), encoding, step_padding=padding))
    assert out.dtype == np.uint8 and out.shape == rgb.shape and out.flags["C_CONTIGUOUS"]
    assert np.array_equal(out, rgb)


def test_mono8_becomes_three_equal_channels():
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    out = image_msg_to_rgb(_raw(grey[:, :, None], "mono8", step_padding=3))
    assert out.shape == (6, 8, 3) and all(np.array_equal(out[:, :, c], grey) for c in range(3))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
def test_mono16_big_and_little_endian_give_the_same_picture(encoding):
    depth = np.linspace(500, 3000, 48).reshape(6, 8, 1).astype(np.uint16)
    little = image_msg_to_rgb(_raw(depth, encoding))
    big = image_msg_to_rgb(_raw(depth, encoding, big_endian=True))
    assert np.array_equal(little, big)
    assert little.min() == 0 and little.max() == 255  # range-stretched by default
    shifted = image_msg_to_rgb(_raw(depth, encoding, big_endian=True, step_padding=2), uint16_mode="shift")
    assert np.array_equal(shifted[:, :, 0], (depth[:, :, 0] >> 8).astype(np.uint8))


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_mosaics_demosaic_to_the_right_colour(pattern, bits):
    colour = np.array([200, 40, 90])  # R, G, B: any swap of R and B shows
    h, w = 8, 10
    mosaic = np.zeros((h, w), np.uint16 if bits == 16 else np.uint8)
    scale = 257 if bits == 16 else 1
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = colour["rgb".index(pattern[2 * dy + dx])] * scale
    out = image_msg_to_rgb(_raw(mosaic[:, :, None], f"bayer_{pattern}{bits}", step_padding=4))
    assert out.shape == (h, w, 3)
    centre = out[3:5, 3:6].reshape(-1, 3).astype(int)
    assert np.abs(centre - colour).max() <= 2, f"{pattern}: got {centre[0]}"


def _yuv_expected(y, u, v):
    """BT.601 limited-range YUV -> RGB, the conversion cameras' 4:2:2 output uses."""
    c, d, e = 1.164 * (y - 16), u - 128, v - 128
    return np.clip([c + 1.596 * e, c - 0.813 * e - 0.391 * d, c + 2.018 * d], 0, 255)


@pytest.mark.parametrize("encoding, order", [("yuv422", "UYVY"), ("uyvy", "UYVY"),
                                             ("yuv422_yuy2", "YUYV"), ("yuyv", "YUYV")])
def test_packed_yuv422_encodings_use_their_byte_order(encoding, order):
    y, u, v = 100, 90, 170
    h, w = 4, 6
    packed = np.zeros((h, w, 2), np.uint8)
    luma, chroma = (1, 0) if order == "UYVY" else (0, 1)
    packed[:, :, luma] = y
    packed[:, 0::2, chroma] = u
    packed[:, 1::2, chroma] = v
    out = image_msg_to_rgb(_raw(packed, encoding, step_padding=4))
    assert np.abs(out[1, 2].astype(float) - _yuv_expected(y, u, v)).max() <= 3, out[1, 2]


@pytest.mark.parametrize("encoding", ["nv12", "nv21"])
def test_planar_nv12_and_nv21_decode_with_their_chroma_order(encoding):
    y, u, v = 100, 90, 170
    h, w = 4, 6
    planes = np.empty((h + h // 2, w, 1), np.uint8)
    planes[:h] = y
    first, second = (u, v) if encoding == "nv12" else (v, u)
    planes[h:, 0::2] = first
    planes[h:, 1::2] = second
    msg = _raw(planes, encoding, step_padding=2)
    msg.height = h  # the message's height is the picture's, not the planes'
    out = image_msg_to_rgb(msg)
    assert out.shape == (h, w, 3)
    assert np.abs(out[2, 3].astype(float) - _yuv_expected(y, u, v)).max() <= 3, out[2, 3]


def test_float_depth_maps_finite_range_and_nan_to_black():
    depth = np.linspace(0.5, 4.0, 48, dtype=np.float32).reshape(6, 8, 1)
    depth[0, 0, 0] = np.nan
    out = image_msg_to_rgb(_raw(depth, "32FC1"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[5, 7, 0] == 255


def test_row_padding_is_not_ignored():
    # Padding bytes are junk; a converter that ignores `step` would shear rows into them.
    rgb = _rgb(5, 7)
    out = image_msg_to_rgb(_raw(rgb, "rgb8", step_padding=11, fill=255))
    assert np.array_equal(out, rgb)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(encoding="weird42"), "unsupported image encoding"),
        (dict(height=0), "empty"),
        (dict(width=0), "empty"),
        (dict(step=10), "shorter than one row"),
        (dict(data=b"\x00" * 10), "needs step\\*height"),
        (dict(height=100_000, width=100_000, data=b""), "MP"),
    ],
)
def test_malformed_raw_images_raise_clear_conversion_errors(change, words):
    msg = _raw(_rgb(), "rgb8")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(ImageConversionError, match=words):
        image_msg_to_rgb(msg)


def test_conversion_error_is_a_value_error_and_odd_width_yuv_is_refused():
    assert issubclass(ImageConversionError, ValueError)
    msg = _raw(np.zeros((4, 5, 2), np.uint8), "yuv422")
    with pytest.raises(ImageConversionError, match="even width"):
        image_msg_to_rgb(msg)


def _compressed(data: bytes, fmt: str = "jpeg"):
    header = SimpleNamespace(stamp=SimpleNamespace(sec=0, nanosec=0), frame_id="")
    return SimpleNamespace(format=fmt, data=data, header=header)


def test_png_round_trip_is_exact_and_jpeg_is_close():
    rgb = np.ascontiguousarray(np.repeat(np.repeat(_rgb(6, 8), 8, axis=0), 8, axis=1))
    png = image_msg_to_rgb(_compressed(encode_compressed(rgb, "png"), "png"))
    assert np.array_equal(png, rgb)
    jpeg = image_msg_to_rgb(_compressed(encode_compressed(rgb, "jpeg", quality=95)))
    assert jpeg.shape == rgb.shape
    assert np.abs(jpeg.astype(int) - rgb.astype(int)).mean() < 6  # channel order kept, only jpeg loss


def test_sixteen_bit_png_depth_and_compressed_depth_header():
    depth = np.linspace(400, 4000, 64 * 48).reshape(48, 64).astype(np.uint16)
    ok, png = cv2.imencode(".png", depth)
    assert ok
    out = image_msg_to_rgb(_compressed(png.tobytes(), "16UC1; png compressed"))
    assert out.shape == (48, 64, 3) and out.min() == 0 and out.max() == 255
    with_header = b"\x00" * 12 + png.tobytes()  # compressed_depth_image_transport's config header
    assert np.array_equal(image_msg_to_rgb(_compressed(with_header, "16UC1; compressedDepth png")), out)


# -- compressed_image_transport's format strings ------------------------------------------
#
# imdecode hands back exactly the array the publisher gave imencode, so a test
# encodes the array the plugin would have encoded for that format string.


def _encoded(ext: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def _tile(rgb: np.ndarray, k: int = 8) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(np.repeat(rgb, k, axis=0), k, axis=1))


RED = np.zeros((16, 16, 3), np.uint8)
RED[:, :, 0] = 220


@pytest.mark.parametrize("codec", [".jpg", ".png"])
@pytest.mark.parametrize(
    "fmt, stored",
    [
        ("rgb8; {c} compressed rgb8", lambda rgb: rgb),  # RGB bytes compressed as they are
        ("rgb8; {c} compressed bgr8", lambda rgb: rgb[:, :, ::-1]),  # what the plugin writes
        ("bgr8; {c} compressed bgr8", lambda rgb: rgb[:, :, ::-1]),
        ("rgba8; {c} compressed bgr8", lambda rgb: rgb[:, :, ::-1]),
        ("{c}", lambda rgb: rgb[:, :, ::-1]),  # bare codec name: OpenCV's BGR
    ],
)
def test_compressed_colour_order_follows_the_format_string(codec, fmt, stored):
    name = "jpeg" if codec == ".jpg" else "png"
    out = image_msg_to_rgb(_compressed(_encoded(codec, np.ascontiguousarray(stored(RED))),
                                       fmt.format(c=name)))
    assert out[8, 8, 0] > 200 and out[8, 8, 1] < 30 and out[8, 8, 2] < 30, out[8, 8]


@pytest.mark.parametrize(
    "fmt, stored",
    [
        ("rgb8; png compressed rgb8", lambda rgb: rgb),
        ("bgr8; png compressed bgr8", lambda rgb: rgb[:, :, ::-1]),
        ("rgba8; png compressed rgba8", lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])),
        ("bgra8; png compressed bgra8",
         lambda rgb: np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 7, np.uint8)])),
        ("rgb16; png compressed bgr16", lambda rgb: rgb[:, :, ::-1].astype(np.uint16) * 257),
        ("rgb16; png compressed rgb16", lambda rgb: rgb.astype(np.uint16) * 257),
        ("bayer_rggb8; png compressed ", None),  # not a colour encoding: stored as is
    ],
)
def test_every_png_layout_decodes_exactly(fmt, stored):
    rgb = _tile(_rgb())
    if stored is None:  # an RGGB mosaic of rgb
        mosaic = np.zeros(rgb.shape[:2], np.uint8)
        mosaic[0::2, 0::2] = rgb[0::2, 0::2, 0]
        mosaic[0::2, 1::2] = rgb[0::2, 1::2, 1]
        mosaic[1::2, 0::2] = rgb[1::2, 0::2, 1]
        mosaic[1::2, 1::2] = rgb[1::2, 1::2, 2]
        expected = image_msg_to_rgb(_raw(mosaic[:, :, None], "bayer_rggb8"))
        out = image_msg_to_rgb(_compressed(_encoded(".png", mosaic), fmt))
        assert np.array_equal(out, expected)
        return
    out = image_msg_to_rgb(_compressed(_encoded(".png", np.ascontiguousarray(stored(rgb))), fmt))
    assert np.array_equal(out, rgb)


@pytest.mark.parametrize("fmt", ["mono8; jpeg compressed mono8", "mono8; jpeg compressed ",
                                 "mono16; jpeg compressed mono8", "8UC1; png compressed ", "png"])
def test_mono_formats_give_grey(fmt):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    ext = ".jpg" if "jpeg" in fmt else ".png"
    out = image_msg_to_rgb(_compressed(_encoded(ext, grey), fmt))
    assert out.shape == (32, 64, 3)
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 1], out[:, :, 2])
    assert np.abs(out[:, :, 0].astype(int) - grey).mean() < 3


def test_mono16_png_keeps_sixteen_bits_like_the_raw_image():
    depth = np.linspace(400, 4000, 64 * 48).reshape(48, 64).astype(np.uint16)
    out = image_msg_to_rgb(_compressed(_encoded(".png", depth), "mono16; png compressed "))
    assert np.array_equal(out, image_msg_to_rgb(_raw(depth[:, :, None], "mono16")))


def test_float_tiff_reads_as_32fc1():
    depth = np.linspace(0.5, 6.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    depth[0, :5] = np.nan
    out = image_msg_to_rgb(_compressed(_encoded(".tiff", depth), "32FC1; tiff compressed "))
    assert np.array_equal(out, image_msg_to_rgb(_raw(depth[:, :, None], "32FC1")))


# -- compressed_depth_image_transport ---------------------------------------------------

#: RVL of the 4x3 image below, written by compressed_depth_image_transport's own
#: RvlCodec::CompressRVL (image_transport_plugins rolling, built from source):
#: runs of zeros and non-zeros, rising and falling deltas and a wrap past 65535.
RVL_PIXELS = [0, 0, 1000, 1001, 1003, 0, 0, 0, 65535, 7, 7, 300]
RVL_WORDS = bytes.fromhex("24f38a23f38c8d340af3fffd00001099")


def _rvl_payload(cols=4, rows=3, words=RVL_WORDS) -> bytes:
    import struct

    return struct.pack("<II", cols, rows) + words


def _depth_msg(encoding: str, codec: str, body: bytes, a: float = 0.0, b: float = 0.0, kind: int = 0):
    import struct

    return _compressed(struct.pack("<iff", kind, a, b) + body, f"{encoding}; compressedDepth {codec}")


def _quantise(depth: np.ndarray, depth_max: float = 10.0, z0: float = 100.0):
    """compressed_depth_image_transport's inverse-depth quantisation (its default parameters)."""
    a = np.float32(z0 * (z0 + 1.0))
    b = np.float32(1.0 - a / np.float32(depth_max))
    with np.errstate(divide="ignore"):
        q = np.where(depth < depth_max, a / depth + b, 0)
    return np.nan_to_num(q).astype(np.uint16), float(a), float(b)


def test_rvl_decodes_what_the_reference_codec_wrote():
    from infmllm_ros.ros.images import decode_rvl

    assert decode_rvl(_rvl_payload()).ravel().tolist() == RVL_PIXELS
    assert decode_rvl(_rvl_payload()).shape == (3, 4)


@pytest.mark.parametrize(
    "payload, words",
    [
        (_rvl_payload(words=RVL_WORDS[:8]), "truncated"),
        (_rvl_payload(cols=3, rows=3), "more than"),
        (_rvl_payload(cols=0), "no pixel"),
        (b"\x01\x00", "shorter"),
        (_rvl_payload(cols=100_000, rows=100_000), "exceeds"),
    ],
    ids=["truncated", "too-many-pixels", "zero-size", "no-header", "huge"],
)
def test_broken_rvl_raises_a_clear_error(payload, words):
    from infmllm_ros.ros.images import decode_rvl

    with pytest.raises(ImageConversionError, match=words):
        decode_rvl(payload)


def test_sixteen_bit_compressed_depth_rvl_is_decoded():
    out = image_msg_to_rgb(_depth_msg("16UC1", "rvl", _rvl_payload()))
    raw = np.array(RVL_PIXELS, np.uint16).reshape(3, 4)
    assert np.array_equal(out, image_msg_to_rgb(_raw(raw[:, :, None], "16UC1")))


@pytest.mark.parametrize("codec", ["png", "rvl"])
def test_float_compressed_depth_is_the_raw_depth_not_its_inverse(codec):
    """Near must stay near: the 32FC1 image decoded through the header's a, b looks
    like the raw 32FC1 image of the same depth (NaN and beyond-range black)."""
    y, x = np.mgrid[0:48, 0:64]
    depth = (0.6 + 0.1 * x).astype(np.float32)  # 0.6 m at the left .. 6.9 m at the right
    depth[:, 60:] = 12.0  # beyond depth_max: no return
    depth[0, 0] = np.nan
    q, a, b = _quantise(depth)
    if codec == "png":
        body = _encoded(".png", q)
    else:
        from infmllm_ros.ros.images import decode_rvl

        body = _rvl_encode(q)
        assert np.array_equal(decode_rvl(body), q)
    out = image_msg_to_rgb(_depth_msg("32FC1", codec, body, a, b))
    restored = np.where(q > 0, np.float32(a) / (q.astype(np.float32) - np.float32(b)), np.nan)
    assert np.nanmax(np.abs(restored - depth)[:, :60]) < 0.25  # quantisation error at 6.9 m
    assert np.array_equal(out, image_msg_to_rgb(_raw(restored.astype(np.float32)[:, :, None], "32FC1")))
    assert out[10, 0, 0] < out[10, 30, 0] < out[10, 59, 0]  # near is dark, far is bright, like 32FC1
    assert out[10, 62].tolist() == [0, 0, 0] and out[0, 0].tolist() == [0, 0, 0]


def _rvl_encode(q: np.ndarray) -> bytes:
    """RVL as Wilson (2017) describes it; checked against the reference bytes above."""
    import struct

    values, flat, prev, i = [], [int(v) for v in q.ravel()], 0, 0
    while i < len(flat):
        z = i
        while i < len(flat) and flat[i] == 0:
            i += 1
        nz = i
        while nz < len(flat) and flat[nz] != 0:
            nz += 1
        values += [i - z, nz - i]
        for v in flat[i:nz]:
            d = v - prev
            values.append((d << 1) ^ (d >> 31))
            prev = v
        i = nz
    nibbles = []
    for v in values:
        while True:
            nib, v = v & 7, v >> 3
            nibbles.append(nib | (8 if v else 0))
            if not v:
                break
    nibbles += [0] * (-len(nibbles) % 8)
    words = [int("".join(f"{n:x}" for n in nibbles[k:k + 8]), 16) for k in range(0, len(nibbles), 8)]
    return struct.pack("<II", q.shape[1], q.shape[0]) + struct.pack(f"<{len(words)}I", *words)


def test_test_rvl_encoder_matches_the_reference_bytes():
    assert _rvl_encode(np.array(RVL_PIXELS, np.uint16).reshape(3, 4)) == _rvl_payload()


@pytest.mark.parametrize(
    "msg, words",
    [
        (_compressed(b"\x00" * 20, "16UC1; compressedDepth zstd"), "unsupported compressedDepth codec"),
        (_compressed(b"\x00" * 20, "rgb8; compressedDepth png"), "unsupported compressedDepth image encoding"),
        (_compressed(b"\x00" * 8, "32FC1; compressedDepth png"), "header"),
        (_compressed(b"\x00" * 40, "32FC1; compressedDepth png"), "no PNG"),
    ],
    ids=["codec", "encoding", "short", "no-png"],
)
def test_unusable_compressed_depth_says_why(msg, words):
    with pytest.raises(ImageConversionError, match=words):
        image_msg_to_rgb(msg)


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", None],
    ids=["empty", "garbage", "truncated-jpeg"],
)
def test_corrupt_compressed_images_raise_clear_errors(data):
    if data is None:
        data = encode_compressed(np.full((64, 64, 3), 100, np.uint8), "jpeg")[:200]
    with pytest.raises(ImageConversionError, match="compressed image"):
        image_msg_to_rgb(_compressed(data))


def test_is_compressed_tells_the_two_types_apart():
    assert is_compressed(_compressed(b"x"))
    assert not is_compressed(_raw(_rgb(), "rgb8"))


# -- real message classes ----------------------------------------------------------


def test_rclpy_messages_round_trip_with_stamp_and_frame_id():
    pytest.importorskip("sensor_msgs.msg", reason="sensor_msgs (rclpy messages) not importable")
    from sensor_msgs.msg import CompressedImage, Image

    from infmllm_ros.ros.images import rgb_to_compressed_msg, rgb_to_image_msg, stamp_to_seconds

    rgb = np.ascontiguousarray(np.repeat(np.repeat(_rgb(6, 8), 4, axis=0), 4, axis=1))
    for encoding in ("rgb8", "bgr8"):
        msg = rgb_to_image_msg(rgb, stamp=1700000000.25, frame_id="cam_front", encoding=encoding)
        assert isinstance(msg, Image) and msg.encoding == encoding and msg.step == rgb.shape[1] * 3
        assert msg.header.frame_id == "cam_front"
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1700000000, 250_000_000)
        assert stamp_to_seconds(msg.header.stamp) == pytest.approx(1700000000.25)
        assert np.array_equal(image_msg_to_rgb(msg), rgb)
    mono = rgb_to_image_msg(rgb, encoding="mono8")
    assert image_msg_to_rgb(mono).shape == rgb.shape

    comp = rgb_to_compressed_msg(rgb, stamp=(5, 7), frame_id="cam", format="png")
    assert isinstance(comp, CompressedImage) and comp.format == "png"
    assert (comp.header.stamp.sec, comp.header.stamp.nanosec) == (5, 7)
    assert np.array_equal(image_msg_to_rgb(comp), rgb)

    # image_transport's own format string for RGB bytes compressed as they are
    as_is = CompressedImage(format="rgb8; png compressed rgb8")
    as_is.data = encode_compressed(rgb[:, :, ::-1].copy(), "png")  # encode_compressed swaps to BGR: undo it
    assert np.array_equal(image_msg_to_rgb(as_is), rgb)

    broken = CompressedImage(format="jpeg")
    broken.data = b"\xff\xd8\xff\xe0 not really a jpeg"
    with pytest.raises(ImageConversionError):
        image_msg_to_rgb(broken)


def test_rosbags_messages_convert_and_copy_into_rclpy_messages():
    rosbags_typesys = pytest.importorskip("rosbags.typesys")
    store = rosbags_typesys.get_typestore(rosbags_typesys.Stores.ROS2_KILTED)
    Image = store.types["sensor_msgs/msg/Image"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    rgb = _rgb()
    padded = np.zeros((6, 8 * 3 + 8), np.uint8)
    padded[:, :24] = rgb[:, :, ::-1].reshape(6, -1)
    msg = Image(header=Header(stamp=Time(sec=12, nanosec=34), frame_id="bagcam"), height=6, width=8,
                encoding="bgr8", is_bigendian=0, step=32, data=padded.reshape(-1))
    assert np.array_equal(image_msg_to_rgb(msg), rgb)
    # And after a CDR round trip, as a bag reader hands it over.
    again = store.deserialize_cdr(store.serialize_cdr(msg, "sensor_msgs/msg/Image"), "sensor_msgs/msg/Image")
    assert np.array_equal(image_msg_to_rgb(again), rgb)

    pytest.importorskip("sensor_msgs.msg", reason="sensor_msgs (rclpy messages) not importable")
    from infmllm_ros.ros.images import to_rclpy_image

    copied = to_rclpy_image(again)
    assert type(copied).__module__.startswith("sensor_msgs")
    assert (copied.header.stamp.sec, copied.header.stamp.nanosec, copied.header.frame_id) == (12, 34, "bagcam")
    assert copied.step == 32 and np.array_equal(image_msg_to_rgb(copied), rgb)
