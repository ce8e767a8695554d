"""Multi-object tracking between sampled frames, and the events it yields.

Association is ByteTrack (Zhang et al., "ByteTrack: Multi-Object Tracking by
Associating Every Detection Box", ECCV 2022) as ``supervision`` implements it
(``sv.ByteTrack``: a Kalman filter per track, Hungarian matching on IoU, lost
tracks kept for a while). One tracker per class, so a person never inherits a
car's id and ids are short per class ("person 3", "car 1").

ByteTrack is built for video at 10-30 frames/s, where a box overlaps its
previous position. The node samples at 1 frame/s by default, and a walking
person moves about a box width or two between samples, so the IoU gate fails
and new tracks are never confirmed (measured on ``vtest.avi`` at 1 frame/s: only
9% of the person detections came back with an id, tracks 1.9 samples long).
The fix is the buffered IoU of C-BIoU (Yang et al., "Hard to Track Objects with
Irregular Motions and Similar Appearances? Make It Easier by Buffering the
Matching Space", WACV 2023): every box grows by ``match_buffer`` times its
longer side on each side before association (a walking person moves about its
height a second), which restores the overlap of the same object. With 1.0: 59%
of the person detections get an id, tracks 6.1 samples long, and the man
crossing ``vtest.avi`` right to left between 24 s and 31 s keeps one id
(``test/perception/test_tracking.py``). Larger buffers track more (1.5: 71%)
but join people walking close together more often. Limits that remain at
1 frame/s in a crowd: tracks still break into pieces (38 person ids over the
80 s of ``vtest.avi``; a missed detection or a sharp turn starts a new one)
and two people passing close can swap ids.

Events, from a small per-track record kept beside the tracker (in stamp time,
so they hold when the sampling rate changes):

* ``appeared``: a track got its id (ByteTrack confirms a new track on its
  second sighting, so this is one sample after the object is first counted;
  on a camera's first frame every object appears at once);
* ``left``: a track unseen for ``lost_s`` seconds; it says how long the object
  had been seen (its last sighting minus its first);
* ``crossed``: the track's centre went from the left ``0.5 - cross_margin`` of
  the frame to the right ``0.5 - cross_margin`` (or back): the frame's middle
  crossed with a margin, so jitter near the middle never counts;
* ``stayed``: a track still seen after each of ``stay_milestones_s`` (then
  every hour).

A stamp older than the camera's previous one (a bag looping, a clock jump)
restarts that camera's tracks silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from .detector import Detection

__all__ = ["EVENT_KINDS", "REGIONS", "ObjectTracker", "TrackEvent", "TrackerConfig", "region_of"]

#: Horizontal thirds of the frame: where an object's centre is.
REGIONS = ("left", "centre", "right")
#: Event kinds, in the order a line reports them.
EVENT_KINDS = ("appeared", "crossed", "stayed", "left")


def region_of(x_centre: float, width: int) -> str:
    """The third of the frame (``REGIONS``) holding the horizontal pixel ``x_centre``."""
    return REGIONS[min(2, max(0, int(3 * x_centre / max(1, width))))]


@dataclass(frozen=True)
class TrackerConfig:
    """Knobs of :class:`ObjectTracker`; the defaults are tuned for 1 frame/s on the shared clips.

    Attributes:
        frame_rate: samples per second the tracker sees (the node's
            ``sample_rate_hz``); turns ``lost_s`` into ByteTrack's frame count.
        lost_s: seconds a track may go unseen and still keep its id if it is
            found again; after that it has ``left``. 3 s bridges the one- or
            two-sample misses YOLOv3-tiny has on a walking person.
        match_buffer: C-BIoU buffer: boxes grow by this times their longer side
            on each side before matching (0: plain ByteTrack). 1.0 tracks 59% of
            vtest.avi's people detections at 1 frame/s (plain: 9%); more tracks
            more but joins people walking close together.
        cross_margin: ``crossed`` needs the centre to go from ``x < (0.5 - m) W``
            to ``x > (0.5 + m) W`` (or back).
        stay_milestones_s: ages (seconds since first seen) at which a track
            still present gives a ``stayed`` event; after the last, every hour.
    """

    frame_rate: float = 1.0
    lost_s: float = 3.0
    match_buffer: float = 1.0
    cross_margin: float = 0.1
    stay_milestones_s: tuple = (30, 60, 120, 300, 600, 1200, 1800, 3600)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.frame_rate) and self.frame_rate > 0):
            raise ValueError(f"frame_rate must be above 0, got {self.frame_rate}")
        if not (math.isfinite(self.lost_s) and self.lost_s > 0):
            raise ValueError(f"lost_s must be above 0, got {self.lost_s}")
        if not 0.0 <= self.match_buffer <= 5.0:
            raise ValueError(f"match_buffer must be in [0, 5], got {self.match_buffer}")
        if not 0.0 <= self.cross_margin < 0.5:
            raise ValueError(f"cross_margin must be in [0, 0.5), got {self.cross_margin}")
        if list(self.stay_milestones_s) != sorted(self.stay_milestones_s) or any(
                m <= 0 for m in self.stay_milestones_s):
            raise ValueError(f"stay_milestones_s must be increasing and positive, got {self.stay_milestones_s}")


@dataclass(frozen=True)
class TrackEvent:
    """Something that happened to one tracked object.

    Attributes:
        kind: one of ``EVENT_KINDS``: appeared, crossed, stayed, left.
        label: the object's class name.
        track_id: its short id, counted from 1 per camera and class.
        region: where it was: first seen (appeared), last seen (left), now (others).
        direction: crossed only: ``"left to right"`` or ``"right to left"``.
        seconds: left: how long it had been seen; stayed: how long it has been seen.
    """

    kind: str
    label: str
    track_id: int
    region: str
    direction: str = ""
    seconds: float = 0.0

    @property
    def phrase(self) -> str:
        """``'person 7 appeared right'``, ``'person 2 left after 12 s'``, ``'car 1 stayed 2 min'``."""
        who = f"{self.label} {self.track_id}"
        if self.kind == "appeared":
            return f"{who} appeared {self.region}"
        if self.kind == "crossed":
            return f"{who} crossed {self.direction}"
        if self.kind == "stayed":
            return f"{who} stayed {_duration(self.seconds)}"
        if self.kind == "left":  # seen once: no duration to tell
            return f"{who} left after {_duration(self.seconds)}" if self.seconds >= 1 else f"{who} left"
        return f"{who} {self.kind}"

    def as_dict(self) -> dict:
        return asdict(self)


def _duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{int(round(s / 60))} min"
    return f"{s / 3600:.1f} h".replace(".0 h", " h")


@dataclass
class _Track:
    label: str
    track_id: int
    first_seen: float
    last_seen: float
    region: str
    side: str  # "left" / "right" of the middle band, or "" while in it (for crossings)
    next_milestone: int = 0


@dataclass
class _CameraTracks:
    trackers: dict = field(default_factory=dict)  # label -> sv.ByteTrack
    short_ids: dict = field(default_factory=dict)  # (label, ByteTrack id) -> short id
    counters: dict = field(default_factory=dict)  # label -> last short id given
    tracks: dict = field(default_factory=dict)  # (label, short id) -> _Track
    last_stamp: Optional[float] = None


class ObjectTracker:
    """ByteTrack per camera and class, with short ids and events; see the module docstring.

    Not thread-safe on its own: the caller (:class:`~.describer.FrameDescriber`)
    serialises calls.

    Example:
        >>> tracker = ObjectTracker()
        >>> ids, events = tracker.update("front", detections, stamp=12.0, width=768)
        >>> [e.phrase for e in events]
        ['person 1 appeared left']
    """

    def __init__(self, config: Optional[TrackerConfig] = None, **overrides) -> None:
        try:
            import supervision  # noqa: F401
        except ImportError:
            raise ImportError("tracking needs supervision (ByteTrack): pip install --no-deps supervision==0.27.0 "
                              "scipy") from None
        config = config or TrackerConfig()
        if overrides:
            config = TrackerConfig(**{**asdict(config), **overrides})
        self.config = config
        self._cameras: dict[str, _CameraTracks] = {}

    def reset(self, camera: Optional[str] = None) -> None:
        """Forget the tracks (and restart the ids) of one camera, or of all."""
        if camera is None:
            self._cameras.clear()
        else:
            self._cameras.pop(camera, None)

    def active(self, camera: str) -> int:
        """Tracks of ``camera`` that have not left yet."""
        state = self._cameras.get(camera)
        return len(state.tracks) if state else 0

    def update(self, camera: str, detections: Sequence[Detection], stamp: float,
               width: int) -> tuple[list[int], list[TrackEvent]]:
        """Associate one frame's detections with the camera's tracks.

        Args:
            camera: which camera (each has its own tracks and ids).
            detections: this frame's objects (boxes in frame pixels).
            stamp: the frame's time in seconds (any epoch, increasing).
            width: the frame's width in pixels (for regions and crossings).

        Returns:
            ``(ids, events)``: the short track id of each detection (0 for one
            not tracked yet) and the events of this frame, in ``EVENT_KINDS``
            order, then by class and id.
        """
        state = self._cameras.get(camera)
        if state is None or (state.last_stamp is not None and stamp < state.last_stamp):
            state = self._cameras[camera] = _CameraTracks()
        state.last_stamp = stamp
        ids = [0] * len(detections)
        events: list[TrackEvent] = []
        by_label: dict[str, list[int]] = {}
        for i, det in enumerate(detections):
            by_label.setdefault(det.label, []).append(i)
        # Every class with a tracker steps, found this frame or not, so lost tracks age.
        for label in sorted(set(by_label) | set(state.trackers)):
            indices = by_label.get(label, [])
            for index, bytetrack_id in self._associate(state, label, [detections[i] for i in indices]):
                key = (label, bytetrack_id)
                if key not in state.short_ids:
                    state.counters[label] = state.counters.get(label, 0) + 1
                    state.short_ids[key] = state.counters[label]
                ids[indices[index]] = state.short_ids[key]
        seen = set()
        for det, short in zip(detections, ids):
            if short:
                seen.add((det.label, short))
                events.extend(self._saw(state, det, short, stamp, width))
        for key in sorted(set(state.tracks) - seen):
            track = state.tracks[key]
            if stamp - track.last_seen > self.config.lost_s:
                events.append(TrackEvent("left", track.label, track.track_id, track.region,
                                         seconds=track.last_seen - track.first_seen))
                del state.tracks[key]
                # Gone for good: if ByteTrack re-finds it later, that is a new track with a new id.
                for ref in [r for r, v in state.short_ids.items() if r[0] == key[0] and v == key[1]]:
                    del state.short_ids[ref]
        events.sort(key=lambda e: (EVENT_KINDS.index(e.kind), e.label, e.track_id))
        return ids, events

    def _associate(self, state: _CameraTracks, label: str, dets: list[Detection]) -> list[tuple[int, int]]:
        """``(index in dets, ByteTrack id)`` for the detections ByteTrack tracks this frame."""
        import supervision as sv

        tracker = state.trackers.get(label)
        if tracker is None:
            cfg = self.config
            # supervision keeps a track lost for int(frame_rate / 30 * lost_track_buffer) frames.
            tracker = state.trackers[label] = sv.ByteTrack(
                frame_rate=cfg.frame_rate, lost_track_buffer=max(1, math.ceil(30 * cfg.lost_s)))
        if dets:
            xywh = np.array([d.box for d in dets], dtype=np.float32)
            # Grow by the longer side: a walking person moves about its height per second.
            grow = self.config.match_buffer * xywh[:, 2:].max(axis=1, keepdims=True)
            xyxy = np.concatenate([xywh[:, :2] - grow, xywh[:, :2] + xywh[:, 2:] + grow], axis=1)
            found = sv.Detections(xyxy=xyxy, confidence=np.array([d.score for d in dets], np.float32),
                                  class_id=np.zeros(len(dets), int), data={"index": np.arange(len(dets))})
        else:
            found = sv.Detections.empty()
        tracked = tracker.update_with_detections(found)
        if not len(tracked):
            return []
        return [(int(i), int(t)) for i, t in zip(tracked.data["index"], tracked.tracker_id)]

    def _saw(self, state: _CameraTracks, det: Detection, short: int, stamp: float,
             width: int) -> list[TrackEvent]:
        cfg = self.config
        x, _, w, _ = det.box
        centre = (x + w / 2.0) / max(1, width)
        region = region_of(x + w / 2.0, width)
        side = "left" if centre < 0.5 - cfg.cross_margin else "right" if centre > 0.5 + cfg.cross_margin else ""
        key = (det.label, short)
        track = state.tracks.get(key)
        if track is None:
            state.tracks[key] = _Track(det.label, short, stamp, stamp, region, side)
            return [TrackEvent("appeared", det.label, short, region)]
        out = []
        if side and track.side and side != track.side:
            out.append(TrackEvent("crossed", det.label, short, region, direction=f"{track.side} to {side}"))
        track.side = side or track.side
        track.last_seen, track.region = stamp, region
        age = stamp - track.first_seen
        milestones = cfg.stay_milestones_s
        reached = None
        while True:
            i = track.next_milestone
            at = milestones[i] if i < len(milestones) else milestones[-1] + 3600 * (i - len(milestones) + 1)
            if age < at:
                break
            reached = at
            track.next_milestone += 1
        if reached is not None:
            out.append(TrackEvent("stayed", det.label, short, region, seconds=float(reached)))
        return out
