"""The one thread that owns the stream (no ROS imports).

:class:`StreamWorker` loops over three duties and otherwise sleeps:

1. **frames**: for each camera whose sample period has passed and whose slot
   holds an unprocessed image, take it, turn it into a chunk (``make_chunk``:
   conversion + encoder) and append it to the stream;
2. **jobs**: one question / reset at a time from the :class:`~.core.JobQueue`,
   between frames, so a question waits at most one frame's append;
3. **scenes**: every ``scene.period_s`` (when new frames arrived) ask
   ``scene.prompt`` and hand the result to ``on_scene``.

Prefill (frames, questions) checks ``should_stop`` between pieces of at most
``cache.max_chunk_tokens`` and generation between tokens, so :meth:`StreamWorker.stop`
(or a cancelled job) ends any work within one piece or one decoding step.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from .core import FrameRef, FrameSlots, Job, JobQueue, LatencyStats, StampBook

try:  # the engine's stop signal for prefill; a stand-in keeps this module importable without it
    from infmllm_ros.engine.types import Cancelled
except ImportError:  # pragma: no cover - engine (torch) missing
    class Cancelled(RuntimeError):  # type: ignore[no-redef]
        pass

log = logging.getLogger(__name__)


@dataclass
class AnswerResult:
    """An engine Answer plus the exact frames it covers."""

    answer: Any  # infmllm_ros.engine.types.Answer
    oldest: Optional[FrameRef]
    newest: Optional[FrameRef]
    stats: Any  # StreamStats right after the answer
    camera: str = ""


class StreamWorker:
    """Owns ``stream``; see the module docstring.

    Args:
        stream: an engine ``Stream`` (used from this thread only).
        slots: latest frame per camera, filled by the subscriptions.
        jobs: questions and control requests.
        make_chunk: ``(camera, msg) -> (Chunk, FrameRef)``; raises ``ValueError``
            for a frame that cannot be used (it is counted as bad and skipped).
        settings: object with ``sample_rate_hz``, ``scene`` and ``query`` (a
            ``NodeSettings``); replace :attr:`settings` to change them live.
        on_scene: called with an :class:`AnswerResult` for each scene description.
        logger: anything with ``info``/``warning``/``error`` taking one string.
    """

    def __init__(self, stream, slots: FrameSlots, jobs: JobQueue,
                 make_chunk: Callable[[str, Any], Tuple[Any, FrameRef]], settings,
                 on_scene: Optional[Callable[[AnswerResult], None]] = None, logger=None):
        self.stream = stream
        self.slots = slots
        self.jobs = jobs
        self.make_chunk = make_chunk
        self.settings = settings
        self.on_scene = on_scene
        self.log = logger or log
        self.book = StampBook()
        self.latency = LatencyStats()
        self.scenes_published = 0
        self.stats = stream.stats()
        self.error: Optional[str] = None
        #: Moving averages: encode_s (conversion + encoder), append_s (prefill), frame_tokens,
        #: scene_s (a whole scene description).
        self.timing: Dict[str, float] = {}
        #: Longest answer the stream accepts (answers are appended as one chunk); None: no clamp.
        self.max_answer_tokens: Optional[int] = None
        #: What the worker is doing now: "idle", "frame", "query", "reset" or "scene".
        self.activity = "idle"
        #: The stream's state file (``.state.StateFile``) for "save" / "load" jobs; None: off.
        self.state = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_sample: Dict[str, float] = {c: 0.0 for c in slots.cameras}
        self._last_scene = time.monotonic()
        self._frames_since_scene = 0
        self._bad_logged: Dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="infmllm-worker", daemon=True)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._last_scene = time.monotonic()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: Optional[float] = 30.0) -> bool:
        """Stop between tokens / frames and join; True if the thread ended."""
        self._stop.set()
        self.jobs.close()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self._sample_frames()
                job = self.jobs.pop()
                if job is not None:
                    self.activity = job.kind
                    self._run_job(job)
                    worked = True
                if self._scene_due():
                    self.activity = "scene"
                    self._describe_scene()
                    worked = True
            except Exception as exc:  # noqa: BLE001 - keep serving; the reason is logged
                self.error = f"{type(exc).__name__}: {exc}"
                self.log.error(f"worker step failed: {self.error}")
                worked = False
                self._stop.wait(0.5)
            self.activity = "idle"
            if not worked and not self._stop.is_set():
                self._wake.wait(self._idle_timeout())
                self._wake.clear()

    def _period(self) -> float:
        return 1.0 / float(self.settings.sample_rate_hz)

    def _idle_timeout(self) -> float:
        now = time.monotonic()
        waits = [0.5]
        period = self._period()
        for cam in self.slots.cameras:
            if self.slots.has_fresh(cam):
                waits.append(self._last_sample[cam] + period - now)
        sp = self.settings.scene.period_s
        if sp > 0 and self._frames_since_scene:
            waits.append(self._last_scene + sp - now)
        return max(0.001, min(waits))

    # -- frames -------------------------------------------------------------------

    def _sample_frames(self) -> bool:
        worked = False
        period = self._period()
        for cam in self.slots.cameras:
            if self._stop.is_set():
                break
            now = time.monotonic()
            if now < self._last_sample[cam] + period or not self.slots.has_fresh(cam):
                continue
            msg = self.slots.take(cam)
            if msg is None:
                continue
            self._last_sample[cam] = now
            worked = True
            self.activity = "frame"
            t0 = time.monotonic()
            try:
                chunk, ref = self.make_chunk(cam, msg)
            except ValueError as exc:
                self._bad_frame(cam, str(exc))
                continue
            t1 = time.monotonic()
            try:
                self.stream.append_chunk(chunk, should_stop=self._stop.is_set)
            except Cancelled:  # stopping: the pieces already appended stay, the frame is not counted
                break
            t2 = time.monotonic()
            self.timing["encode_s"] = _ewma(self.timing.get("encode_s"), t1 - t0)
            self.timing["append_s"] = _ewma(self.timing.get("append_s"), t2 - t1)
            self.timing["frame_tokens"] = _ewma(self.timing.get("frame_tokens"), float(len(chunk)))
            back = self.book.jump_back(ref)
            self.book.add(ref)
            if back is not None:
                self.log.warning(
                    f"camera '{cam}': image stamp jumped back {back:.3f} s (to {ref.sec}."
                    f"{ref.nanosec:09d}): a bag replayed in a loop or a clock reset? Answers "
                    "report frames by their order in the stream")
            # Stats first: whoever sees the frame counted as encoded (GetStats) also sees it held.
            self.stats = self.stream.stats()
            self.slots.mark_encoded(cam)
            self._frames_since_scene += 1
        return worked

    def _bad_frame(self, cam: str, reason: str) -> None:
        self.slots.mark_bad(cam, reason)
        now = time.monotonic()
        if now - self._bad_logged.get(cam, -1e9) > 5.0:  # at most one warning per 5 s
            self._bad_logged[cam] = now
            self.log.warning(f"camera '{cam}': skipping a frame that cannot be used: {reason}")

    # -- jobs ---------------------------------------------------------------------

    def _should_stop(self, job: Optional[Job]) -> Callable[[], bool]:
        if job is None:
            return self._stop.is_set
        return lambda: self._stop.is_set() or job.should_stop()

    def _run_job(self, job: Job) -> None:
        try:
            if job.kind == "query":
                self._query(job)
            elif job.kind == "save":
                job.finish(result=self.state.save(self.stream, self.book.refs(),
                                                  force=job.args.get("force", True)))
            elif job.kind == "load":
                res = self.state.load(self.stream, set_aside=False)
                if res.loaded:
                    self.book.restore(list(res.refs))
                    self._frames_since_scene = 0
                    self.stats = self.stream.stats()
                job.finish(result=res, error=None if res.loaded else res.reason)
            elif job.kind == "reset":
                self.stream.reset()
                self.book.clear()
                self.slots.reset_counts()
                self._frames_since_scene = 0
                self.stats = self.stream.stats()
                job.finish(result=self.stats)
            else:
                job.finish(error=f"unknown job kind {job.kind!r}")
        except Exception as exc:  # noqa: BLE001 - report to the caller, keep the worker up
            self.log.error(f"{job.kind} failed: {type(exc).__name__}: {exc}")
            job.finish(error=f"{job.kind} failed: {type(exc).__name__}: {exc}")
        finally:
            self.jobs.done(job)
            if not job.done:
                job.finish(error="not answered")

    def _query(self, job: Job) -> None:
        a = job.args
        camera = a.get("camera", "")
        stats = self.stream.stats()
        if stats.newest_stamp is None:
            job.finish(error="no camera frames in memory yet: wait for images and ask again")
            return
        if camera and not stats.cameras.get(camera):
            job.finish(error=f"no frames from camera '{camera}' in memory yet")
            return
        result = self._ask(a["question"], a["max_new_tokens"], camera, job)
        self.latency.add(time.monotonic() - job.created)
        job.finish(result=result)

    def _ask(self, question: str, max_new_tokens: int, camera: str,
             job: Optional[Job]) -> AnswerResult:
        if self.max_answer_tokens is not None:
            max_new_tokens = min(max_new_tokens, self.max_answer_tokens)
        ans = self.stream.ask(question, max_new_tokens=max_new_tokens, camera=camera,
                              should_stop=self._should_stop(job),
                              on_text=job.on_text if job is not None else None)
        self.stats = self.stream.stats()
        return AnswerResult(ans, self.book.lookup(ans.oldest_stamp, camera),
                            self.book.lookup(ans.newest_stamp, camera), self.stats, camera)

    # -- scenes -------------------------------------------------------------------

    def _scene_due(self) -> bool:
        sp = self.settings.scene.period_s
        if sp <= 0 or self._frames_since_scene == 0 or self._stop.is_set():
            return False
        return time.monotonic() >= self._last_scene + sp

    def _describe_scene(self) -> None:
        self._last_scene = time.monotonic()
        self._frames_since_scene = 0
        s = self.settings.scene
        cams = self.slots.cameras
        camera = cams[0] if len(cams) == 1 else ""
        newest = self.book.newest
        t0 = time.monotonic()
        res = self._ask(s.prompt, s.max_new_tokens, "", None)
        self.timing["scene_s"] = _ewma(self.timing.get("scene_s"), time.monotonic() - t0)
        if res.answer.cancelled or self._stop.is_set():
            return
        if newest is not None:  # the newest frame described: appended before the prompt
            res.newest = newest
        res.camera = camera
        self.scenes_published += 1
        if self.on_scene is not None:
            self.on_scene(res)


def _ewma(old: Optional[float], new: float, alpha: float = 0.2) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
