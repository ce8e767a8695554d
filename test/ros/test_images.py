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
