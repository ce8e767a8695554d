"""The previous offline describer: OpenCV's HOG people detector and Haar face cascade.

Kept as the baseline ``infmllm-bench memory`` times the YOLOv3-tiny describer
(:mod:`.describer`) against, in the same run; the node no longer uses it. It
finds people and faces only, so it cannot answer questions about other objects.

It runs only trained models that OpenCV ships:

* people: OpenCV's HOG + linear SVM pedestrian detector
  (``cv2.HOGDescriptor_getDefaultPeopleDetector``, Dalal & Triggs 2005);
* faces: the frontal-face Haar cascade under ``cv2.data.haarcascades``
  (Viola & Jones 2001);
* motion: frame differencing against the previous frame of the same camera;
* brightness and the dominant colour names: plain pixel statistics.

Example line: ``"12:00:05 front: 3 people (left, centre), 1 face, strong motion
left, bright, mostly grey"``.
OpenCV 5 moved the HOG and cascade detectors out of the main wheel; use
``opencv-python-headless`` 4.x (the 4.x wheels ship both the detector and the
cascade files). :class:`DetectorUnavailableError` says so when they are missing.

Tuning notes (measured on the two clips in shared/data, 2-core CPU; frames and
people counted by eye on saved frames):

* HOG's window is 64x128 with the body about 96 px tall inside it, so a person
  shorter than ~100 px in the image it scans is missed. The pedestrians in
  ``vtest.avi`` are 70-110 px tall at 768x576: scanning at 480 px wide found
  almost nobody, 960 px wide (x1.25) finds most of them. Larger people are
  reached by HOG's own image pyramid.
* A person filling the frame height (the indoor clip) cannot fit a window
  whose body is 3/4 of its height, so a second, cheap scan at 320 px wide pads
  the image by replicating its border. Padding the fine scan instead gave
  similar hits at twice the cost.
* winStride 8 / pyramid scale 1.1 cost about a sixth of winStride 4 / scale
  1.05 and missed at most one more person per frame on the checked frames.
* Hits with an SVM margin below 0.5 were mostly partial (an arm, half a
  body) or loose boxes around a person already found.
* Checked by eye: vtest.avi, 11 frames with 3-8 visible pedestrians: every
  box was on a person, 3-5 found per frame (far people under ~80 px and
  people in tight groups are missed or merged). Indoor clip, 27 frames: 0 on
  all 7 empty-room frames; the person found on 15 of 20 frames (misses: two
  people half out of the frame, a man mid-stride, a back view in black on two frames).
  No face was found in either clip (faces there are small or turned away),
  and none falsely.
* Time per 768 px frame: about 250 ms while another job kept about one of
  the two cores busy (fine scan ~170 ms, close scan ~40 ms, faces ~70 ms, the rest ~5 ms).
  ``detect_width=640`` with ``detect_faces=False`` halves it, but then finds
  only 0-3 of vtest's pedestrians per frame (they are under ~110 px).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import cv2
import numpy as np

from .describer import brightness_word, dominant_colour, time_phrase
from .frames import validate_frame
from .tracking import REGIONS, region_of

__all__ = [
    "DetectorUnavailableError",
    "HogHaarConfig",
    "HogHaarDescriber",
    "HogObservation",
]

Box = tuple[int, int, int, int]  # x, y, width, height in the input frame's pixels


class DetectorUnavailableError(RuntimeError):
    """The installed OpenCV lacks a detector the describer needs."""


@dataclass
class HogObservation:
    """What the describer saw in one frame.

    ``boxes`` and ``face_boxes`` are ``(x, y, w, h)`` in the pixels of the
    frame passed to :meth:`HogHaarDescriber.describe`. ``motion`` is the fraction
    of the frame that changed since the previous frame of the same camera
    (0.0 for a camera's first frame). ``brightness`` is mean luma, 0..255.
    """

    camera: str
    stamp: float
    people: int
    faces: int
    motion: float
    motion_region: str  # "left" / "centre" / "right" / "across", or "" without motion
    brightness: float
    colour: str
    boxes: list[Box] = field(default_factory=list)
    face_boxes: list[Box] = field(default_factory=list)
    people_regions: list[str] = field(default_factory=list)
    text: str = ""
    elapsed_s: float = 0.0  # wall time describe() took


@dataclass
class HogHaarConfig:
    """The describer's knobs; defaults are tuned on the shared clips (see module notes)."""

    #: Width the frame is resized to (up or down) for the fine HOG scan. Its
    #: cost grows with the square; a person must be ~100 px tall in the scanned
    #: image, so 960 finds people from ~80 px tall in a 768 px wide frame.
    detect_width: int = 960
    #: Width of the second, coarse scan for people standing close (0: skip it).
    close_scan_width: int = 320
    #: Border added around the coarse scan's image, as a fraction of its
    #: height, so people taller than the frame still fit HOG's window.
    pad_fraction: float = 0.25
    win_stride: int = 8
    pyramid_scale: float = 1.1
    #: SVM margin a HOG window needs to count as a person. HOG's raw hits with
    #: margin below ~0.5 on these clips were mostly lamp posts, signs, limbs.
    min_person_score: float = 0.5
    #: Two people boxes whose intersection covers at least this fraction of the
    #: smaller one are one person (HOG fires on a person at several scales and
    #: on a person's limbs; plain IoU does not merge a box nested in a larger one).
    overlap_merge: float = 0.6
    detect_faces: bool = True
    #: The face cascade scans the frame downscaled to this width (never
    #: upscaled). At full 768 px it cost ~200 ms a frame here, at 480 px ~50 ms;
    #: faces it then misses are under ~30 px, too small to say much anyway.
    face_scan_width: int = 480
    #: Faces smaller than this (in scanned pixels) are ignored: below ~20 px
    #: the cascade mostly fires on texture.
    min_face_px: int = 20
    face_scale_factor: float = 1.2
    face_min_neighbors: int = 5
    #: Width of the grey thumbnail used for motion, brightness and colour.
    #: Small enough to be cheap, large enough to see a walking person.
    stats_width: int = 160
    #: Per-pixel luma change (0..255) that counts as motion; above the
    #: flicker and compression noise of the shared clips (~10).
    motion_pixel_threshold: int = 25
    #: Changed fraction of the frame below which there is "no motion". On the
    #: shared clips a still scene stays under 0.1% (compression noise).
    motion_min_fraction: float = 0.002
    #: From here "motion" instead of "slight motion": a few pedestrians
    #: walking in vtest.avi change ~0.7-1.5% of its thumbnail.
    motion_fraction: float = 0.01
    #: From here "strong motion": one person walking near the camera in the
    #: indoor clip changes 4-6%.
    motion_strong_fraction: float = 0.04
    #: "utc" writes HH:MM:SS of the stamp (UTC); "relative" writes seconds
    #: since the first frame this describer saw, e.g. "t+12.5s"; "none" omits it.
    time_format: Literal["utc", "relative", "none"] = "utc"

    def __post_init__(self) -> None:
        if self.detect_width < 64:
            raise ValueError(f"detect_width must be at least HOG's window width 64, got {self.detect_width}")
        if self.close_scan_width and self.close_scan_width < 64:
            raise ValueError(f"close_scan_width must be 0 or at least 64, got {self.close_scan_width}")
        if not 0.0 <= self.pad_fraction <= 1.0:
            raise ValueError(f"pad_fraction must be in [0, 1], got {self.pad_fraction}")
        if self.win_stride not in (4, 8, 16):
            raise ValueError(f"win_stride must be 4, 8 or 16 (multiples of HOG's cell), got {self.win_stride}")
        if self.pyramid_scale <= 1.0:
            raise ValueError(f"pyramid_scale must be above 1, got {self.pyramid_scale}")
        if not 0.0 < self.overlap_merge <= 1.0:
            raise ValueError(f"overlap_merge must be in (0, 1], got {self.overlap_merge}")
        if self.face_scan_width < 24 or self.face_scale_factor <= 1.0:
            raise ValueError("face_scan_width must be at least 24 and face_scale_factor above 1")
        if self.stats_width < 16:
            raise ValueError(f"stats_width must be at least 16, got {self.stats_width}")
        if not 0.0 <= self.motion_min_fraction <= self.motion_fraction <= self.motion_strong_fraction <= 1.0:
            raise ValueError("need 0 <= motion_min_fraction <= motion_fraction <= motion_strong_fraction <= 1")
        if self.time_format not in ("utc", "relative", "none"):
            raise ValueError(f"time_format must be 'utc', 'relative' or 'none', got {self.time_format!r}")


@dataclass
class _CameraState:
    previous_thumb: Optional[np.ndarray] = None


class HogHaarDescriber:
    """Describe frames with OpenCV's shipped detectors; keeps per-camera motion state.

    One instance serves any number of cameras. ``describe`` holds a lock for its
    whole run, so calls from several threads are serialised rather than racing
    on the detectors or on a camera's previous frame; the node's single worker
    thread never waits on it.

    Example:
        >>> d = HogHaarDescriber()
        >>> obs = d.describe(frame_rgb, camera="front", stamp=1700000000.0)
        >>> obs.text
        '22:13:20 front: 2 people (centre, right), slight motion centre, bright, mostly green'
    """

    def __init__(self, config: Optional[HogHaarConfig] = None, **overrides) -> None:
        config = config or HogHaarConfig()
        self.config = replace(config, **overrides) if overrides else config
        self._hog = _load_people_detector()
        self._face_cascade = _load_face_cascade() if self.config.detect_faces else None
        self._cameras: dict[str, _CameraState] = {}
        self._first_stamp: Optional[float] = None
        self._lock = threading.Lock()

    def reset(self, camera: Optional[str] = None) -> None:
        """Forget the previous frame of one camera (or all), e.g. after a seek."""
        with self._lock:
            if camera is None:
                self._cameras.clear()
                self._first_stamp = None
            else:
                self._cameras.pop(camera, None)

    def describe(self, frame_rgb: np.ndarray, camera: str, stamp: float) -> HogObservation:
        """Describe one RGB frame of ``camera`` taken at ``stamp`` (seconds since the epoch)."""
        started = time.perf_counter()
        frame = validate_frame(frame_rgb)
        with self._lock:
            if self._first_stamp is None:
                self._first_stamp = stamp
            state = self._cameras.setdefault(camera, _CameraState())

            grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            people_boxes = self._detect_people(frame)
            face_boxes = self._detect_faces(grey)
            thumb_rgb, thumb_grey = self._thumbnails(frame, grey)
            motion, motion_region = self._motion(state, thumb_grey)
            brightness = float(thumb_grey.mean())
            colour = dominant_colour(thumb_rgb, pair=True)
            relative_to = self._first_stamp

        width = frame.shape[1]
        regions = [region_of(x + w / 2.0, width) for x, _, w, _ in people_boxes]
        obs = HogObservation(
            camera=camera,
            stamp=float(stamp),
            people=len(people_boxes),
            faces=len(face_boxes),
            motion=motion,
            motion_region=motion_region,
            brightness=brightness,
            colour=colour,
            boxes=people_boxes,
            face_boxes=face_boxes,
            people_regions=regions,
        )
        obs.text = self.format_line(obs, relative_to=relative_to)
        obs.elapsed_s = time.perf_counter() - started
        return obs

    # -- the line ---------------------------------------------------------------

    def format_line(self, obs: HogObservation, relative_to: Optional[float] = None) -> str:
        """One factual line for ``obs``; the only place the wording lives."""
        parts = [_people_phrase(obs.people, obs.people_regions)]
        if obs.faces:
            parts.append(f"{obs.faces} face" + ("s" if obs.faces != 1 else ""))
        parts.append(self._motion_phrase(obs.motion, obs.motion_region))
        parts.append(brightness_word(obs.brightness))
        parts.append(f"mostly {obs.colour}")
        when = time_phrase(obs.stamp, self.config.time_format, relative_to)
        head = f"{when} {obs.camera}" if when else obs.camera
        head = head.strip()
        return f"{head}: {', '.join(parts)}" if head else ", ".join(parts)

    def _motion_phrase(self, fraction: float, region: str) -> str:
        cfg = self.config
        if fraction < cfg.motion_min_fraction:
            return "no motion"
        if fraction >= cfg.motion_strong_fraction:
            strength = "strong motion"
        elif fraction >= cfg.motion_fraction:
            strength = "motion"
        else:
            strength = "slight motion"
        return f"{strength} {region}".strip()

    # -- detectors --------------------------------------------------------------

    def _detect_people(self, frame: np.ndarray) -> list[Box]:
        cfg = self.config
        height, width = frame.shape[:2]
        # Two scans: a fine one for people small in the frame, and a coarse
        # padded one for people too tall to fit HOG's window in the fine scan.
        # Padding the fine scan instead cost twice as much for the same hits.
        rects, scores = self._scan(frame, cfg.detect_width, 0.0)
        if cfg.close_scan_width:
            close_rects, close_scores = self._scan(frame, cfg.close_scan_width, cfg.pad_fraction)
            rects = np.concatenate([rects, close_rects])
            scores = np.concatenate([scores, close_scores])
        keep = scores >= cfg.min_person_score
        rects, scores = rects[keep], scores[keep]
        boxes = []
        for i in _merge_nested(rects, scores, cfg.overlap_merge):
            x, y, w, h = rects[i]
            # Clip to the frame: a box reaches into the padding when a person
            # is cut by the frame edge.
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(width), x + w), min(float(height), y + h)
            if x1 > x0 and y1 > y0:
                boxes.append((int(x0), int(y0), int(round(x1 - x0)), int(round(y1 - y0))))
        boxes.sort(key=lambda b: b[0])
        return boxes

    def _scan(self, frame: np.ndarray, scan_width: int, pad_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Run HOG on ``frame`` resized to ``scan_width``; boxes come back in frame pixels."""
        cfg = self.config
        height, width = frame.shape[:2]
        factor = scan_width / width
        scan_height = max(1, round(height * factor))
        interpolation = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
        scanned = cv2.resize(frame, (scan_width, scan_height), interpolation=interpolation)
        pad_y = int(round(pad_fraction * scan_height))
        pad_x = pad_y // 2  # people are tall: the frame's top and bottom cut them more than its sides
        if pad_y:
            scanned = cv2.copyMakeBorder(scanned, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_REPLICATE)
        empty = (np.zeros((0, 4)), np.zeros((0,)))
        if scanned.shape[0] < 128 or scanned.shape[1] < 64:
            return empty  # smaller than one HOG window: nobody can be found
        rects, weights = self._hog.detectMultiScale(
            scanned,
            winStride=(cfg.win_stride, cfg.win_stride),
            padding=(8, 8),
            scale=cfg.pyramid_scale,
        )
        if len(rects) == 0:
            return empty
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        rects[:, 0] -= pad_x
        rects[:, 1] -= pad_y
        return rects / factor, np.ravel(weights).astype(np.float64)

    def _detect_faces(self, grey: np.ndarray) -> list[Box]:
        if self._face_cascade is None:
            return []
        cfg = self.config
        height, width = grey.shape
        factor = min(1.0, cfg.face_scan_width / width)  # upscaling only adds false hits
        small = cv2.resize(grey, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA) if factor < 1.0 else grey
        small = cv2.equalizeHist(small)  # the cascade was trained on equalised faces
        found = self._face_cascade.detectMultiScale(
            small,
            scaleFactor=cfg.face_scale_factor,
            minNeighbors=cfg.face_min_neighbors,
            minSize=(cfg.min_face_px, cfg.min_face_px),
        )
        return [tuple(int(round(v / factor)) for v in box) for box in found]

    # -- pixel statistics -------------------------------------------------------

    def _thumbnails(self, frame: np.ndarray, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width = self.config.stats_width
        height = max(1, round(frame.shape[0] * width / frame.shape[1]))
        rgb = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        small_grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
        return rgb, small_grey

    def _motion(self, state: _CameraState, thumb_grey: np.ndarray) -> tuple[float, str]:
        cfg = self.config
        # Blur first so sensor noise and compression blocks do not count as motion.
        current = cv2.GaussianBlur(thumb_grey, (5, 5), 0)
        previous, state.previous_thumb = state.previous_thumb, current
        if previous is None or previous.shape != current.shape:
            return 0.0, ""  # first frame of this camera, or its resolution changed
        changed = cv2.absdiff(current, previous) > cfg.motion_pixel_threshold
        fraction = float(changed.mean())
        if fraction < cfg.motion_min_fraction:
            return fraction, ""
        column_mass = changed.sum(axis=0).astype(np.float64)
        thirds = np.array_split(column_mass, 3)
        shares = np.array([t.sum() for t in thirds]) / column_mass.sum()
        best = int(np.argmax(shares))
        region = REGIONS[best] if shares[best] >= 0.5 else "across"
        return fraction, region


# -- helpers (pure functions, tested through HogHaarDescriber) ---------------------


def _load_people_detector():
    if not hasattr(cv2, "HOGDescriptor") or not hasattr(cv2, "HOGDescriptor_getDefaultPeopleDetector"):
        raise DetectorUnavailableError(
            f"OpenCV {cv2.__version__} has no HOG people detector (OpenCV 5 moved it out of the main "
            "wheel); install opencv-python-headless<5"
        )
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    return hog


def _load_face_cascade():
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = os.path.join(folder, "haarcascade_frontalface_default.xml")
    if not hasattr(cv2, "CascadeClassifier") or not os.path.isfile(path):
        raise DetectorUnavailableError(
            f"OpenCV {cv2.__version__} ships no frontal-face Haar cascade (looked for {path!r}); "
            "install opencv-python-headless<5, or pass detect_faces=False"
        )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise DetectorUnavailableError(f"could not load the Haar cascade {path!r}")
    return cascade


def _merge_nested(rects: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression measuring overlap against the smaller box.

    Returns the indices kept, best score first. Overlap is intersection over
    the smaller area, so a box nested inside a larger one (the same person
    found at two pyramid levels, or a limb inside a body) is suppressed, while
    two people walking side by side (overlapping by about half) both stay.
    """
    order = list(np.argsort(-scores))
    kept: list[int] = []
    areas = rects[:, 2] * rects[:, 3]
    while order:
        best = order.pop(0)
        kept.append(best)
        bx, by, bw, bh = rects[best]
        survivors = []
        for other in order:
            ox, oy, ow, oh = rects[other]
            iw = min(bx + bw, ox + ow) - max(bx, ox)
            ih = min(by + bh, oy + oh) - max(by, oy)
            inter = max(0.0, iw) * max(0.0, ih)
            if inter / min(areas[best], areas[other]) < threshold:
                survivors.append(other)
        order = survivors
    return kept


def _people_phrase(count: int, regions: list[str]) -> str:
    if count == 0:
        return "no people"
    noun = "person" if count == 1 else "people"
    where = [r for r in REGIONS if r in regions]
    return f"{count} {noun} ({', '.join(where)})"
