"""validate_frame: every plausible numpy image becomes RGB uint8 HxWx3, the rest raise FrameError."""

import numpy as np
import pytest

from infmllm_ros.perception.frames import FrameError, validate_frame


def _gradient(h=6, w=8):
    """An RGB frame whose channels differ, so channel-order mistakes show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 30, y * 40, np.full((h, w), 200)], axis=-1).astype(np.uint8)


def test_conforming_rgb_frame_is_returned_unchanged_without_a_copy():
    frame = _gradient()
    out = validate_frame(frame)
    assert out is frame


def test_grey_2d_and_single_channel_become_three_equal_channels():
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    for arr in (grey, grey[:, :, None]):
        out = validate_frame(arr)
        assert out.shape == (6, 8, 3) and out.dtype == np.uint8
        assert all(np.array_equal(out[:, :, c], grey) for c in range(3))
        assert out.flags["C_CONTIGUOUS"]


def test_rgba_drops_alpha_and_bgr_flag_reorders_channels():
    rgb = _gradient()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(validate_frame(rgba), rgb)
    bgra = np.dstack([rgb[:, :, ::-1], np.zeros(rgb.shape[:2], np.uint8)])
    assert np.array_equal(validate_frame(bgra, bgr=True), rgb)
    assert np.array_equal(validate_frame(np.ascontiguousarray(rgb[:, :, ::-1]), bgr=True), rgb)


def test_non_contiguous_view_comes_back_contiguous_with_the_same_pixels():
    rgb = _gradient(10, 12)
    view = rgb[::2, ::3]
    out = validate_frame(view)
    assert out.flags["C_CONTIGUOUS"] and np.array_equal(out, view)


def test_channel_first_and_batch_of_one_are_unpacked():
    rgb = _gradient()
    assert np.array_equal(validate_frame(np.transpose(rgb, (2, 0, 1))), rgb)
    assert np.array_equal(validate_frame(rgb[None]), rgb)


@pytest.mark.parametrize(
    "arr, words",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((4, 0), np.uint8), "empty"),
        (np.zeros((7,), np.uint8), "dimensions"),
        (np.zeros((2, 3, 4, 5, 6), np.uint8), "dimensions"),
        (np.zeros((6, 8, 2), np.uint8), "channel count 2"),
        (np.zeros((6, 8, 5), np.uint8), "channel count 5"),
        (np.zeros((2, 6, 8, 3), np.uint8), "batch of 2"),
    ],
)
def test_unusable_shapes_raise_frame_error_naming_the_problem(arr, words):
    with pytest.raises(FrameError, match=words):
        validate_frame(arr)


def test_frame_error_is_a_value_error_and_non_arrays_are_refused():
    assert issubclass(FrameError, ValueError)
    with pytest.raises(FrameError, match="numpy array"):
        validate_frame([[1, 2], [3, 4]])


def test_uint16_range_mode_stretches_the_used_range_to_full_8_bit():
    # A 12-bit sensor in a 16-bit container: >>8 would leave it nearly black.
    mono16 = np.linspace(100, 4000, 6 * 8).reshape(6, 8).astype(np.uint16)
    out = validate_frame(mono16)
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[:, :, 0].ravel().astype(int)) >= 0)  # order preserved


def test_uint16_shift_mode_keeps_the_high_byte():
    mono16 = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    out = validate_frame(mono16, uint16_mode="shift")
    assert out[0, :, 0].tolist() == [0, 0, 1, 255]


def test_flat_uint16_frame_keeps_its_level_instead_of_dividing_by_zero():
    out = validate_frame(np.full((4, 4), 0x8000, np.uint16))
    assert np.all(out == 0x80)


def test_float_frames_in_unit_range_and_in_byte_range():
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert validate_frame(unit)[0, :, 0].tolist() == [0, 128, 255]
    byte_scale = np.array([[0.0, 100.0, 255.0]], dtype=np.float64)
    assert validate_frame(byte_scale)[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_nan_and_inf_raise(bad):
    arr = np.zeros((4, 4, 3), np.float32)
    arr[1, 2, 0] = bad
    with pytest.raises(FrameError, match="NaN or inf"):
        validate_frame(arr)


def test_float_out_of_range_and_wide_integers_raise():
    with pytest.raises(FrameError, match="expected"):
        validate_frame(np.full((4, 4), -0.5, np.float32))
    with pytest.raises(FrameError, match="0..255"):
        validate_frame(np.full((4, 4), 1000, np.int32))
    assert validate_frame(np.full((4, 4), 9, np.int64)).max() == 9


def test_bool_mask_becomes_black_and_white():
    mask = np.array([[True, False]])
    assert validate_frame(mask)[0, :, 0].tolist() == [255, 0]


def test_large_frame_is_downscaled_to_max_side_keeping_aspect():
    big = np.zeros((3000, 6000, 3), np.uint8)
    big[:, 3000:] = 255  # right half white: must stay right half after resizing
    out = validate_frame(big)
    assert out.shape == (2048, 4096, 3)
    assert out[:, :2000].max() == 0 and out[:, 2100:].min() == 255
    assert validate_frame(np.zeros((100, 400), np.uint8), max_side=200).shape == (50, 200, 3)


def test_frame_above_the_pixel_cap_raises_before_converting():
    # A broadcast view: 120 MP of shape, but no memory, so the test is cheap and
    # proves the cap is checked before any pixel is touched.
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (10000, 12000, 3))
    with pytest.raises(FrameError, match="MP"):
        validate_frame(huge)
    with pytest.raises(FrameError, match="MP"):
        validate_frame(np.zeros((100, 100), np.uint8), max_pixels=5000)
