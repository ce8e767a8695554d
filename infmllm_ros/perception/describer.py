"""The offline frame describer: objects, tracks and events in one short line per frame.

The pipeline every user without VLM weights runs:

1. :class:`~.detector.ObjectDetector`: YOLOv3-tiny (80 COCO classes, the
   bundled default) or the user's own Darknet / ONNX detector, via ``cv2.dnn``;
2. :class:`~.tracking.ObjectTracker`: ByteTrack per camera and class with a
   buffered IoU for 1 frame/s, short ids per class, and the events appeared,
   crossed, stayed, left;
3. pixel statistics: each object's dominant colour (the middle of its box)
   and the frame's brightness;
4. :meth:`FrameDescriber.format_line`: the one place the wording lives.

Example lines (``vtest.avi`` at 1 frame/s from its start; the indoor clip from
frame 240 with ``time_format="relative"``)::

    22:13:50 front: 5 people: 4 in black (3 centre, right) and 1 in blue (right), 1 cyan car (right), 1 white truck (right); car 1 stayed 30 s, truck 1 stayed 30 s
    22:13:51 front: 6 people: 5 in black (left, 2 centre, 2 right) and 1 in blue (right), 1 cyan car (right), 1 white truck (right); person 11 crossed right to left
    t+23.0s room: nothing detected; person 1 left after 19 s

The line reads: time (UTC, or ``t+12.5s`` relative, or none), camera, a
light word only when the frame is not normally lit, then per class (most
frequent first) the count and where (thirds of the frame) in which colour,
then this frame's events with the objects' short ids. Everything comes from
the frame sequence, so the same frames give the same lines.

:class:`Observation` holds the same facts structured (objects with class,
track id, box, region, colour; events), for benchmarks that need ground truth.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any, Literal, Optional

import cv2
import numpy as np

from .detector import Detection, DetectorConfig, ObjectDetector
from .frames import validate_frame
from .tracking import REGIONS, ObjectTracker, TrackerConfig, TrackEvent, region_of

__all__ = [
    "DESCRIBER_VERSION",
    "DescriberConfig",
    "FrameDescriber",
    "Observation",
    "SeenObject",
    "brightness_word",
    "dominant_colour",
    "plural",
    "time_phrase",
]

#: Changes whenever the line's wording or the Observation's fields change (caches key on it).
DESCRIBER_VERSION = "yolo-bytetrack-2"

Box = tuple[int, int, int, int]  # x, y, width, height in the input frame's pixels


@dataclass(frozen=True)
class SeenObject:
    """One object in one frame.

    Attributes:
        label: class name (``"person"``, ``"car"`` ...).
        track_id: short id of its track, counted from 1 per camera and class;
            0 while the tracker has not confirmed it (its first sighting).
        score: detector confidence in ``[0, 1]``.
        box: ``(x, y, w, h)`` in the frame's pixels.
        region: third of the frame holding the box centre: left, centre, right.
        colour: dominant colour name of the middle of the box.
    """

    label: str
    track_id: int
    score: float
    box: Box
    region: str
    colour: str


@dataclass
class Observation:
    """What the describer saw in one frame, structured; ``text`` is the line.

    Attributes:
        camera: the camera's name.
        stamp: the frame's time, seconds since the epoch.
        objects: every object found, best score first.
        events: what happened this frame (``TrackEvent``: appeared, crossed,
            stayed, left), in that order.
        counts: objects per class name.
        brightness: mean luma of the frame, 0..255.
        light: ``dark`` / ``dim`` / ``normal light`` / ``bright`` (the line
            shows it only when it is not ``normal light``).
        colour: the frame's dominant colour name(s), e.g. ``"green"`` or
            ``"grey and green"`` (not in the line).
        text: the line, without a trailing newline.
        elapsed_s: wall time ``describe`` took; ``detect_s``: the detector's part.
    """

    camera: str
    stamp: float
    objects: list[SeenObject] = field(default_factory=list)
    events: list[TrackEvent] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    brightness: float = 0.0
    light: str = ""
    colour: str = ""
    text: str = ""
    elapsed_s: float = 0.0
    detect_s: float = 0.0

    @property
    def people(self) -> int:
        return self.counts.get("person", 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (boxes as lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Observation":
        """The inverse of :meth:`to_dict` (also reads its JSON round trip)."""
        data = dict(data)
        data["objects"] = [SeenObject(**{**o, "box": tuple(o["box"])}) for o in data.get("objects", [])]
        data["events"] = [TrackEvent(**e) for e in data.get("events", [])]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DescriberConfig:
    """The describer's knobs.

    Attributes:
        detector: which detector and its thresholds (:class:`~.detector.DetectorConfig`).
        tracker: tracking and event settings (:class:`~.tracking.TrackerConfig`).
        time_format: ``"utc"`` writes HH:MM:SS of the stamp; ``"relative"``
            seconds since the first frame this describer saw (``t+12.5s``);
            ``"none"`` omits it.
        stats_width: width of the thumbnail for the frame's brightness and colour.
        colour_inset: fraction of an object's box trimmed from each side before
            naming its colour, so the background around it does not count.
        max_groups: most (region, colour) groups listed for one class; a class
            with more is listed by region only ("30 people (left 12, ...)").
        max_events: most events written in one line; the rest are counted
            ("+3 more events"). The Observation keeps them all.
    """

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    time_format: Literal["utc", "relative", "none"] = "utc"
    stats_width: int = 160
    colour_inset: float = 0.2
    max_groups: int = 6
    max_events: int = 8

    def __post_init__(self) -> None:
        if self.time_format not in ("utc", "relative", "none"):
            raise ValueError(f"time_format must be 'utc', 'relative' or 'none', got {self.time_format!r}")
        if self.stats_width < 16:
            raise ValueError(f"stats_width must be at least 16, got {self.stats_width}")
        if not 0.0 <= self.colour_inset < 0.5:
            raise ValueError(f"colour_inset must be in [0, 0.5), got {self.colour_inset}")
        if self.max_groups < 1 or self.max_events < 1:
            raise ValueError("max_groups and max_events must be at least 1")


class FrameDescriber:
    """Describe frames: detect, track, name colours, write the line; see the module docstring.

    One instance serves any number of cameras (tracks and ids are per camera).
    ``describe`` holds a lock for its whole run, so calls from several threads
    are serialised rather than racing on a camera's tracks.

    Args:
        config: the knobs; defaults throughout (the bundled YOLOv3-tiny).
        detector: an already loaded :class:`~.detector.ObjectDetector` to use
            instead of loading ``config.detector`` (benchmarks share one).
        **overrides: fields of ``config`` to replace, e.g. ``time_format="relative"``.

    Raises:
        DetectorLoadError: a detector file is missing or unusable (names the file).

    Example:
        >>> d = FrameDescriber()
        >>> d.describe(frame_rgb, camera="room", stamp=1700000000.0).text
        '22:13:20 room: 1 person in black (centre); person 1 appeared centre'
    """

    def __init__(self, config: Optional[DescriberConfig] = None, detector: Optional[ObjectDetector] = None,
                 **overrides: Any) -> None:
        config = config or DescriberConfig()
        self.config = replace(config, **overrides) if overrides else config
        self.detector = detector if detector is not None else ObjectDetector(self.config.detector)
        self.tracker = ObjectTracker(self.config.tracker)
        self._first_stamp: Optional[float] = None
        self._lock = threading.Lock()

    def fingerprint(self) -> str:
        """A short hash of the version, the settings and the detector files: equal
        fingerprints give equal lines for equal frames (for caches of lines)."""
        det = self.detector
        parts = {"version": DESCRIBER_VERSION, "config": asdict(self.config), "input": det.input_size,
                 "files": [(p, _size(p)) for p in (det.model_path, det.config_path, det.names_path)]}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def reset(self, camera: Optional[str] = None) -> None:
        """Forget the tracks of one camera (or all, and the relative-time origin), e.g. after a seek."""
        with self._lock:
            self.tracker.reset(camera)
            if camera is None:
                self._first_stamp = None

    def describe(self, frame_rgb: np.ndarray, camera: str, stamp: float) -> Observation:
        """Describe one RGB ``uint8`` ``(H, W, 3)`` frame of ``camera`` taken at ``stamp``
        (seconds since the epoch).

        Raises:
            FrameError: (a ``ValueError``) the frame is unusable or the detector
                failed on it; the camera's tracks are left as they were.
        """
        started = time.perf_counter()
        frame = validate_frame(frame_rgb)
        with self._lock:
            detections = self.detector.detect(frame)
            detect_s = time.perf_counter() - started
            if self._first_stamp is None:
                self._first_stamp = stamp
            height, width = frame.shape[:2]
            ids, events = self.tracker.update(camera, detections, float(stamp), width)
            relative_to = self._first_stamp
        objects = [self._seen(frame, det, track_id) for det, track_id in zip(detections, ids)]
        thumb = _thumbnail(frame, self.config.stats_width)
        brightness = float(cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY).mean())
        obs = Observation(
            camera=camera,
            stamp=float(stamp),
            objects=objects,
            events=events,
            counts=dict(Counter(o.label for o in objects)),
            brightness=brightness,
            light=brightness_word(brightness),
            colour=dominant_colour(thumb, pair=True),
            detect_s=detect_s,
        )
        obs.text = self.format_line(obs, relative_to=relative_to)
        obs.elapsed_s = time.perf_counter() - started
        return obs

    def _seen(self, frame: np.ndarray, det: Detection, track_id: int) -> SeenObject:
        x, y, w, h = det.box
        inset = self.config.colour_inset
        x0, x1 = int(x + inset * w), int(math.ceil(x + (1 - inset) * w))
        y0, y1 = int(y + inset * h), int(math.ceil(y + (1 - inset) * h))
        crop = frame[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
        if crop.shape[1] > 32:  # naming a colour needs no more pixels than this
            crop = cv2.resize(crop, (32, max(1, round(crop.shape[0] * 32 / crop.shape[1]))),
                              interpolation=cv2.INTER_AREA)
        return SeenObject(det.label, track_id, det.score, det.box, region_of(x + w / 2.0, frame.shape[1]),
                          dominant_colour(crop))

    # -- the line ---------------------------------------------------------------

    def format_line(self, obs: Observation, relative_to: Optional[float] = None) -> str:
        """The one line for ``obs``; the only place the wording lives."""
        when = time_phrase(obs.stamp, self.config.time_format, relative_to)
        head = f"{when} {obs.camera}".strip()
        if obs.light and obs.light != "normal light":
            head = f"{head} ({obs.light})"
        body = self._objects_phrase(obs.objects) or "nothing detected"
        if obs.events:
            shown = [e.phrase for e in obs.events[: self.config.max_events]]
            hidden = len(obs.events) - len(shown)
            if hidden:
                shown.append(f"+{hidden} more events")
            body += "; " + ", ".join(shown)
        return f"{head}: {body}" if head else body

    def _objects_phrase(self, objects: list[SeenObject]) -> str:
        counts = Counter(o.label for o in objects)
        return ", ".join(self._class_phrase(label, [o for o in objects if o.label == label])
                         for label in sorted(counts, key=lambda name: (-counts[name], name)))

    def _class_phrase(self, label: str, mine: list[SeenObject]) -> str:
        """``'1 white truck (right)'``, ``'3 people in black (centre, 2 right)'``,
        ``'4 people: 3 in black (centre, 2 right) and 1 in blue (left)'``.

        The colour goes where English puts it, before the noun ("in" for people, whose colour
        is their clothes), so a small language model reads "white truck" as it would in prose;
        a class of several colours gives its total first, then each colour.
        """
        n = len(mine)
        noun = plural(label, n)
        colours = Counter(o.colour for o in mine)
        if len(colours) * len({o.region for o in mine}) > self.config.max_groups:
            return f"{n} {noun} ({_regions(mine)})"  # a crowd: where only
        if len(colours) == 1:
            colour = mine[0].colour
            named = f"{noun} in {colour}" if label == "person" else f"{colour} {noun}"
            return f"{n} {named} ({_regions(mine)})"
        parts = []
        for colour in sorted(colours, key=lambda c: (-colours[c], c)):
            group = [o for o in mine if o.colour == colour]
            parts.append(f"{len(group)} {'in ' if label == 'person' else ''}{colour} ({_regions(group)})")
        return f"{n} {noun}: " + ", ".join(parts[:-1]) + " and " + parts[-1]


def _regions(objects: list[SeenObject]) -> str:
    """The regions of ``objects`` in frame order, with a count where more than one: ``'centre, 2 right'``."""
    counts = Counter(o.region for o in objects)
    return ", ".join(f"{counts[r]} {r}" if counts[r] > 1 else r for r in REGIONS if r in counts)


# -- shared helpers (also used by the HOG/Haar baseline in hog.py) -------------------


def time_phrase(stamp: Optional[float], fmt: str, relative_to: Optional[float] = None) -> str:
    """``"22:13:20"`` (UTC) for ``fmt="utc"``, ``"t+2.5s"`` since ``relative_to``, or ``""``."""
    if fmt == "none" or stamp is None or not math.isfinite(stamp):
        return ""
    if fmt == "relative":
        origin = stamp if relative_to is None else relative_to
        return f"t+{stamp - origin:.1f}s"
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%H:%M:%S")


def brightness_word(mean_luma: float) -> str:
    """Name a mean luma (0..255): dark, dim, normal light, bright."""
    if mean_luma < 50:
        return "dark"
    if mean_luma < 100:
        return "dim"
    if mean_luma < 170:
        return "normal light"
    return "bright"


_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
                      "skis": "skis", "scissors": "scissors"}


def plural(label: str, count: int) -> str:
    """English plural of a class name for ``count`` (COCO's irregular ones included)."""
    if count == 1:
        return label
    if label in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[label]
    if label.endswith(("s", "x", "ch", "sh")):
        return label + "es"
    return label + "s"


#: Hue ranges (OpenCV hue, 0..180) of the chromatic colour names. Red wraps.
_HUE_NAMES = (
    (0, 10, "red"),
    (10, 22, "orange"),
    (22, 34, "yellow"),
    (34, 80, "green"),
    (80, 100, "cyan"),
    (100, 130, "blue"),
    (130, 160, "purple"),
    (160, 181, "red"),
)


def dominant_colour(rgb: np.ndarray, pair: bool = False) -> str:
    """Name the colour covering most of an RGB image; with ``pair``, two names when close.

    Pixels with little saturation are black, grey or white by value; the rest
    are named by hue, with dark orange called brown (bricks, wood, soil).
    """
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.int32)
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    names = np.empty(hue.shape, dtype=object)
    achromatic = (sat < 60) | (val < 40)
    names[achromatic & (val < 60)] = "black"
    names[achromatic & (val >= 60) & (val < 190)] = "grey"
    names[achromatic & (val >= 190)] = "white"
    chromatic = ~achromatic
    for low, high, name in _HUE_NAMES:
        names[chromatic & (hue >= low) & (hue < high)] = name
    names[chromatic & (hue >= 5) & (hue < 22) & (val < 150)] = "brown"
    labels, counts = np.unique(names.astype(str), return_counts=True)
    order = np.lexsort((labels, -counts))  # most pixels first, ties by name: deterministic
    first = str(labels[order[0]])
    if pair and len(order) > 1 and counts[order[1]] >= 0.6 * counts[order[0]]:
        return f"{first} and {labels[order[1]]}"
    return first


def _thumbnail(frame: np.ndarray, width: int) -> np.ndarray:
    height = max(1, round(frame.shape[0] * width / frame.shape[1]))
    interpolation = cv2.INTER_AREA if width < frame.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(frame, (width, height), interpolation=interpolation)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return -1
