"""The node's bookkeeping that needs no ROS: frame slots, the job queue, stamps.

* :class:`FrameSlots`: the latest image per camera. A subscription callback only
  :meth:`~FrameSlots.put`\\ s into its camera's slot; a frame still waiting when
  the next one arrives is overwritten and counted as dropped, so a slow model
  never makes a queue grow.
* :class:`JobQueue` / :class:`Job`: questions (and control requests such as
  reset) handed to the one worker thread that owns the stream, bounded, with a
  ``queue`` or ``reject`` policy while busy, cancellable, timed out by the caller.
* :class:`StampBook`: float stamps (what the engine keeps) back to the exact
  ``(sec, nanosec)`` and ``frame_id`` of the frame they came from.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple


# ----------------------------------------------------------------------------- stamps


def stamp_to_sec(sec: int, nanosec: int) -> float:
    """``builtin_interfaces/Time`` fields -> float seconds."""
    return float(sec) + float(nanosec) * 1e-9


def sec_to_stamp(t: Optional[float]) -> Tuple[int, int]:
    """Float seconds -> ``(sec, nanosec)``, rounded to the nearest microsecond
    (float64 cannot hold nanoseconds of an epoch time). ``None`` -> ``(0, 0)``."""
    if t is None or not math.isfinite(t) or t <= 0:
        return (0, 0)
    us = int(round(t * 1e6))
    return (us // 1_000_000, (us % 1_000_000) * 1000)


@dataclass(frozen=True)
class FrameRef:
    """Where one appended frame came from."""

    camera: str
    sec: int
    nanosec: int
    frame_id: str

    @property
    def seconds(self) -> float:
        return stamp_to_sec(self.sec, self.nanosec)


class StampBook:
    """Remembers the exact stamp and frame_id of recently appended frames.

    The engine reports ``oldest_stamp`` / ``newest_stamp`` as floats; :meth:`lookup`
    returns the :class:`FrameRef` that float came from, or a rounded one when the
    frame has aged out of the book (``capacity`` most recent frames).
    """

    def __init__(self, capacity: int = 100_000):
        self._refs: "collections.OrderedDict[float, FrameRef]" = collections.OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.newest: Optional[FrameRef] = None
        self._last: Dict[str, FrameRef] = {}  # per camera: the last frame added

    def add(self, ref: FrameRef) -> float:
        key = ref.seconds
        with self._lock:
            self._refs[key] = ref
            self._refs.move_to_end(key)
            while len(self._refs) > self._capacity:
                self._refs.popitem(last=False)
            self.newest = ref
            self._last[ref.camera] = ref
        return key

    def jump_back(self, ref: FrameRef) -> Optional[float]:
        """How many seconds ``ref`` lies before the last frame added from its camera, or None.

        A jump back (a bag replayed in a loop, a clock reset) is not an error: the
        stream orders frames by arrival. It is reported so the node can warn, as tf
        buffers do when time goes backwards.
        """
        with self._lock:
            last = self._last.get(ref.camera)
        if last is None or (ref.sec, ref.nanosec) >= (last.sec, last.nanosec):
            return None
        return last.seconds - ref.seconds

    def lookup(self, t: Optional[float], camera: str = "") -> Optional[FrameRef]:
        if t is None:
            return None
        with self._lock:
            ref = self._refs.get(t)
        if ref is None:
            sec, ns = sec_to_stamp(t)
            ref = FrameRef(camera, sec, ns, "")
        return ref

    def refs(self) -> List[FrameRef]:
        """Every remembered frame, oldest first (for saving beside the stream's state)."""
        with self._lock:
            return list(self._refs.values())

    def restore(self, refs: List[FrameRef]) -> None:
        """Replace the book with ``refs`` (oldest first), e.g. after a state file was loaded."""
        with self._lock:
            self._refs.clear()
            self._last.clear()
            for ref in refs[-self._capacity:]:
                self._refs[ref.seconds] = ref
                self._refs.move_to_end(ref.seconds)
                self._last[ref.camera] = ref
            self.newest = refs[-1] if refs else None

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()
            self._last.clear()
            self.newest = None


# ------------------------------------------------------------------------- frame slots


class RateMeter:
    """Events per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._window = window_s
        self._clock = clock
        self._times: Deque[float] = collections.deque()

    def tick(self) -> None:
        now = self._clock()
        self._times.append(now)
        self._trim(now)

    def rate(self) -> float:
        now = self._clock()
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], self._times[-1] - self._times[0])
        return (len(self._times) - 1) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()


class StampGaps:
    """Frames lost before they reached the node, estimated from gaps in one camera's stamps.

    A camera stamps its frames at a steady period. Samples that DDS drops on the
    way (best-effort QoS, large frames, a busy machine) are invisible to the
    subscriber except as holes in that sequence, so each interval between
    consecutive ``header.stamp``\ s counts ``round(interval / period) - 1``
    missing frames. The period is the shortest positive interval among the last
    ``window`` ones: losses only lengthen intervals, so the shortest is the
    camera's own period (give or take its jitter; with one frame in ten
    received, about one interval in ten is a single period).

    Stamps that repeat or go backwards (a looping bag, a restarted driver)
    start a new sequence, and an interval longer than ``pause_s`` is a pause of
    the source, not loss. Unstamped frames (stamp 0) are not counted.
    """

    def __init__(self, window: int = 200, pause_s: float = 10.0):
        self._window: Deque[float] = collections.deque(maxlen=window)
        self._pause_s = pause_s
        self._last: Optional[float] = None
        self._lost_before = 0  # lost frames in intervals that have left the window
        self.received = 0  # stamped frames seen

    def add(self, stamp: float) -> None:
        if not stamp > 0:
            return
        self.received += 1
        last, self._last = self._last, stamp
        if last is None or stamp <= last:
            return  # first frame, or a new sequence
        interval = stamp - last
        if interval > self._pause_s:
            return
        if len(self._window) == self._window.maxlen:
            self._lost_before += self._missing(self._window[0], self.period)
        self._window.append(interval)

    @property
    def period(self) -> Optional[float]:
        """The camera's estimated frame period in seconds (None before two frames)."""
        return min(self._window) if self._window else None

    @staticmethod
    def _missing(interval: float, period: Optional[float]) -> int:
        if not period:
            return 0
        return max(0, int(round(interval / period)) - 1)

    @property
    def lost(self) -> int:
        """Estimated frames lost in transport so far."""
        p = self.period
        return self._lost_before + sum(self._missing(i, p) for i in self._window)

    def recent_lost_fraction(self) -> float:
        """Share of the camera's frames lost over the intervals in the window (0..1)."""
        p = self.period
        if not p:
            return 0.0
        lost = sum(self._missing(i, p) for i in self._window)
        return lost / (lost + len(self._window))


@dataclass
class CameraCounts:
    received: int = 0  # messages that reached the callback
    dropped: int = 0  # overwritten before the worker took them (rate limit / slow model)
    encoded: int = 0  # turned into tokens and appended
    bad: int = 0  # could not be converted or encoded
    last_error: str = ""
    # received but not settled yet: waiting in the slot, being described, or queued for the
    # model; received == dropped + encoded + bad + pending at any one snapshot
    pending: int = 0
    received_hz: float = 0.0
    encoded_hz: float = 0.0
    lost_estimate: int = 0  # frames lost before the callback, from gaps in the stamps (StampGaps)
    lost_fraction: float = 0.0  # share of the camera's recent frames lost that way
    camera_hz: float = 0.0  # the camera's own rate estimated from its stamps (0: unknown)
    silent_s: Optional[float] = None  # seconds since the last message arrived; None: none yet


class FrameSlots:
    """The latest unprocessed message of each camera; thread-safe.

    ``on_put`` is called (outside the lock) after every :meth:`put`, e.g. to wake
    the worker.
    """

    def __init__(self, cameras, on_put: Optional[Callable[[], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._slot: Dict[str, Any] = {c: None for c in cameras}
        self._counts: Dict[str, CameraCounts] = {c: CameraCounts() for c in cameras}
        self._rx = {c: RateMeter(clock=clock) for c in cameras}
        self._enc = {c: RateMeter(clock=clock) for c in cameras}
        self._gaps = {c: StampGaps() for c in cameras}
        self._last_put: Dict[str, Optional[float]] = {c: None for c in cameras}
        self._taken: Dict[str, int] = {c: 0 for c in cameras}  # taken, not settled yet
        # bumped by reset_counts: a frame taken before a reset settles nothing after it
        self._generation = 0
        self._clock = clock
        self._on_put = on_put

    @property
    def cameras(self) -> List[str]:
        return list(self._slot)

    def put(self, camera: str, msg: Any, stamp: Optional[float] = None) -> bool:
        """Store ``msg`` as ``camera``'s latest; True if it overwrote an unprocessed one.

        ``stamp``: the message's header stamp in seconds, for the lost-frame estimate.
        """
        with self._lock:
            c = self._counts[camera]
            c.received += 1
            self._rx[camera].tick()
            if stamp is not None:
                self._gaps[camera].add(stamp)
            self._last_put[camera] = self._clock()
            overwrote = self._slot[camera] is not None
            if overwrote:
                c.dropped += 1
            self._slot[camera] = msg
        if self._on_put is not None:
            self._on_put()
        return overwrote

    def take(self, camera: str) -> Any:
        """The latest unprocessed message of ``camera`` (and empty the slot), or None.

        A message taken counts as pending until :meth:`mark_encoded` or :meth:`mark_bad`
        settles it."""
        taken = self.take_sample(camera)
        return None if taken is None else taken[0]

    def take_sample(self, camera: str) -> Optional[Tuple[Any, int]]:
        """Like :meth:`take`, with the counting generation it was taken in (pass it to
        :meth:`mark_encoded` / :meth:`mark_bad`, so that a frame in flight across a
        :meth:`reset_counts` is not settled into the new counts)."""
        with self._lock:
            msg, self._slot[camera] = self._slot[camera], None
            if msg is None:
                return None
            self._taken[camera] += 1
            return msg, self._generation

    def has_fresh(self, camera: str) -> bool:
        with self._lock:
            return self._slot[camera] is not None

    def _settle(self, camera: str, generation: Optional[int]) -> bool:
        if generation is not None and generation != self._generation:
            return False  # taken before a reset: its counts are gone
        self._taken[camera] = max(0, self._taken[camera] - 1)
        return True

    def mark_encoded(self, camera: str, generation: Optional[int] = None) -> None:
        with self._lock:
            if self._settle(camera, generation):
                self._counts[camera].encoded += 1
                self._enc[camera].tick()

    def mark_bad(self, camera: str, reason: str, generation: Optional[int] = None) -> None:
        with self._lock:
            if self._settle(camera, generation):
                self._counts[camera].bad += 1
                self._counts[camera].last_error = reason

    def counts(self) -> Dict[str, CameraCounts]:
        """A copy of each camera's counters, with current rates."""
        with self._lock:
            out = {}
            now = self._clock()
            for cam, c in self._counts.items():
                g = self._gaps[cam]
                last = self._last_put[cam]
                pending = self._taken[cam] + (self._slot[cam] is not None)
                out[cam] = CameraCounts(c.received, c.dropped, c.encoded, c.bad, c.last_error,
                                        pending,
                                        self._rx[cam].rate(), self._enc[cam].rate(),
                                        lost_estimate=g.lost, lost_fraction=g.recent_lost_fraction(),
                                        camera_hz=1.0 / g.period if g.period else 0.0,
                                        silent_s=None if last is None else now - last)
            return out

    def totals(self) -> CameraCounts:
        t = CameraCounts()
        for c in self.counts().values():
            t.received += c.received
            t.dropped += c.dropped
            t.encoded += c.encoded
            t.bad += c.bad
            t.pending += c.pending
            t.received_hz += c.received_hz
            t.encoded_hz += c.encoded_hz
            t.lost_estimate += c.lost_estimate
        return t

    def reset_counts(self) -> None:
        """Zero the counters, and forget the frames received before: the waiting ones are
        emptied from their slots, the ones in flight settle nothing (their generation)."""
        with self._lock:
            self._generation += 1
            for cam in self._counts:
                self._counts[cam] = CameraCounts()
                self._gaps[cam] = StampGaps()
                self._slot[cam] = None
                self._taken[cam] = 0


# ---------------------------------------------------------------------------- jobs


class Job:
    """One request for the worker: ``kind`` ("query", "reset" ...) and its arguments.

    The caller waits on :meth:`wait`; the worker calls :meth:`finish`. ``cancel``
    (a cancelled action goal, shutdown) and the ``timeout_s`` deadline make
    :meth:`should_stop` true, which the worker passes to the engine so it stops
    between prefill pieces and tokens. The deadline is the worker's own, so a
    question that cannot be answered in time stops at ``timeout_s`` even when
    the thread waiting for it is late, and never holds up the jobs behind it
    for longer than that.

    Args:
        kind: "query", "reset" ...
        control: control jobs skip the question limit (reset).
        timeout_s: seconds from now after which the job stops and counts as
            timed out (``None``: no deadline).
        **args: the job's arguments (question, camera, max_new_tokens ...).
    """

    _ids = itertools.count(1)

    def __init__(self, kind: str, *, control: bool = False, timeout_s: Optional[float] = None,
                 **args: Any):
        self.id = next(Job._ids)
        self.kind = kind
        self.args = args
        self.control = control
        self.created = time.monotonic()
        self.timeout_s = timeout_s
        self.deadline: Optional[float] = None if timeout_s is None else self.created + timeout_s
        self.started: Optional[float] = None
        self.result: Any = None
        self.error: Optional[str] = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self.on_text: Optional[Callable[[str], None]] = None
        #: said to the caller with a successful result (e.g. that max_new_tokens was limited)
        self.note = ""

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining(self) -> Optional[float]:
        """Seconds left until the deadline (>= 0), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def should_stop(self) -> bool:
        return self._cancel.is_set() or self.expired

    def timeout_reason(self) -> str:
        return (f"timed out after {self.timeout_s:g} s (query.timeout_s): "
                "not answered in time, the question was cancelled")

    def finish(self, result: Any = None, error: Optional[str] = None) -> None:
        self.result, self.error = result, error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)


class JobQueue:
    """Jobs waiting for the worker, bounded by the busy policy.

    ``policy="queue"``: up to ``size`` questions wait while one runs.
    ``policy="reject"``: a question is refused while another runs or waits.
    Control jobs always go in, ahead of questions.
    """

    def __init__(self, size: int = 4, policy: str = "queue",
                 on_submit: Optional[Callable[[], None]] = None):
        self._lock = threading.Lock()
        self._control: Deque[Job] = collections.deque()
        self._questions: Deque[Job] = collections.deque()
        self._running: Optional[Job] = None
        self.size = size
        self.policy = policy
        self._on_submit = on_submit
        self._closed = False
        self.refused = 0

    def configure(self, size: int, policy: str) -> None:
        with self._lock:
            self.size, self.policy = size, policy

    def submit(self, job: Job) -> Optional[str]:
        """Queue ``job``; the reason it was refused, or ``None``."""
        with self._lock:
            if self._closed:
                return "the node is shutting down"
            if job.control:
                self._control.append(job)
            else:
                busy = self._running is not None and not self._running.control
                waiting = len(self._questions)
                if self.policy == "reject" and (busy or waiting):
                    self.refused += 1
                    return ("busy: the model is answering another question "
                            "(query.busy_policy is 'reject'); try again later")
                if waiting >= self.size:
                    self.refused += 1
                    return (f"busy: {waiting} question(s) already waiting "
                            f"(query.queue_size is {self.size}); try again later")
                self._questions.append(job)
        if self._on_submit is not None:
            self._on_submit()
        return None

    def pop(self) -> Optional[Job]:
        """The next job to run (marked running), skipping cancelled ones."""
        with self._lock:
            for q in (self._control, self._questions):
                while q:
                    job = q.popleft()
                    if job.cancelled:
                        job.finish(error="cancelled before it started")
                        continue
                    if job.expired:  # waited out its whole time behind other jobs
                        job.finish(error=job.timeout_reason())
                        continue
                    job.started = time.monotonic()
                    self._running = job
                    return job
            return None

    def done(self, job: Job) -> None:
        with self._lock:
            if self._running is job:
                self._running = None

    def pending(self) -> int:
        with self._lock:
            return len(self._control) + len(self._questions)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None

    def close(self, reason: str = "the node is shutting down") -> List[Job]:
        """Refuse new jobs, fail the waiting ones and cancel the running one."""
        with self._lock:
            self._closed = True
            left = list(self._control) + list(self._questions)
            self._control.clear()
            self._questions.clear()
            running = self._running
        for job in left:
            job.cancel()
            job.finish(error=reason)
        if running is not None:
            running.cancel()
        return left


@dataclass
class LatencyStats:
    """Query latency summary for diagnostics."""

    count: int = 0
    last_s: float = 0.0
    total_s: float = 0.0
    recent: Deque[float] = field(default_factory=lambda: collections.deque(maxlen=50))

    def add(self, s: float) -> None:
        self.count += 1
        self.last_s = s
        self.total_s += s
        self.recent.append(s)

    @property
    def mean_recent_s(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0
