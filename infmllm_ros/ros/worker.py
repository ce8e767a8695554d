"""The threads that own the stream (no ROS imports).

:class:`StreamWorker` runs two threads, a pipeline of two stages:

* the **encoder** thread samples each camera: when a camera's sample period has
  passed and its slot holds an unprocessed image, it takes it and turns it into
  a chunk (``make_chunk``: conversion + frame encoder, e.g. OpenCV detectors and
  the tokenizer), then hands the chunk to the model thread. It never touches
  the stream, so frames keep being encoded at ``sample_rate_hz`` while the
  model answers a question (the conversion and OpenCV release the GIL, so on
  two cores the stages run side by side). At most ``max_ready`` encoded frames
  wait for the model; while that many wait it takes no new frame (the slot
  keeps only the newest, counted as dropped), so a slow model never builds a
  queue.
* the **model** thread owns the stream and loops over three duties, otherwise
  sleeping: (1) one question / reset from the :class:`~.core.JobQueue`;
  (2) append the encoded frames, in order, at least one, then more until a
  question is waiting; (3) every ``scene.period_s`` (when new frames arrived)
  ask ``scene.prompt`` and hand the result to ``on_scene``.

Questions and frames share the model thread by turns: a question waits for at
most one frame's append, frames for at most one answer, and encoding (the
costlier part of a frame with the offline encoder) overlaps the answers.
Prefill (frames, questions) checks ``should_stop`` between pieces of at most
``cache.max_chunk_tokens`` and generation between tokens, so :meth:`StreamWorker.stop`
(or a cancelled or timed-out job) ends any work within one piece or one decoding step.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Tuple

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
                 on_scene: Optional[Callable[[AnswerResult], None]] = None, logger=None,
                 on_reset: Optional[Callable[[], None]] = None):
        self.stream = stream
        self.slots = slots
        self.jobs = jobs
        self.make_chunk = make_chunk
        self.settings = settings
        self.on_scene = on_scene
        self.on_reset = on_reset  # a reset job calls it (e.g. the encoder forgets its tracks)
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
        self._bad_unlogged: Dict[str, int] = {}  # bad frames since the last warning, per camera
        #: Most encoded frames waiting for the model thread (see the module docstring).
        self.max_ready = 4
        self._ready: Deque[Tuple[str, Any, FrameRef, int]] = collections.deque()
        self._ready_lock = threading.Lock()
        self._epoch = 0  # bumped by reset: frames encoded before it are not appended after it
        self._encoder_wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infmllm-worker", daemon=True)
        self._encoder = threading.Thread(target=self._encode_loop, name="infmllm-encoder", daemon=True)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._last_scene = time.monotonic()
        self._thread.start()
        self._encoder.start()

    def wake(self) -> None:
        self._wake.set()
        self._encoder_wake.set()

    def stop(self, timeout: Optional[float] = 30.0) -> bool:
        """Stop between tokens / frames and join; True if the thread ended."""
        self._stop.set()
        self.jobs.close()
        self.wake()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in (self._thread, self._encoder):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not (self._thread.is_alive() or self._encoder.is_alive())

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop -----------------------------------------------------------------

    def _serve(self, step: Callable[[], bool], wake: threading.Event,
               idle_timeout: Callable[[], float], what: str) -> None:
        """One thread's loop: ``step`` until stopped, sleeping on ``wake`` when it did nothing."""
        while not self._stop.is_set():
            try:
                worked = step()
            except Exception as exc:  # noqa: BLE001 - keep serving; the reason is logged
                self.error = f"{type(exc).__name__}: {exc}"
                self.log.error(f"{what} failed: {self.error}")
                worked = False
                self._stop.wait(0.5)
            if not worked and not self._stop.is_set():
                wake.wait(idle_timeout())
                wake.clear()

    def _run(self) -> None:
        self._serve(self._model_step, self._wake, self._idle_timeout, "worker step")

    def _model_step(self) -> bool:
        worked = False
        try:
            job = self.jobs.pop()
            if job is not None:
                self.activity = job.kind
                self._run_job(job)
                worked = True
            worked = self._append_frames() or worked
            if self._scene_due():
                self.activity = "scene"
                self._describe_scene()
                worked = True
        finally:
            self.activity = "idle"
        return worked

    def _period(self) -> float:
        return 1.0 / float(self.settings.sample_rate_hz)

    def _idle_timeout(self) -> float:
        """Model thread: how long to sleep when idle (it is woken by frames and jobs)."""
        waits = [0.5]
        sp = self.settings.scene.period_s
        if sp > 0 and self._frames_since_scene:
            waits.append(self._last_scene + sp - time.monotonic())
        return max(0.001, min(waits))

    # -- frames: the encoder thread -------------------------------------------------

    def _encode_loop(self) -> None:
        self._serve(self._encode_frames, self._encoder_wake, self._encode_timeout, "encoding a frame")

    def _encode_timeout(self) -> float:
        """Encoder thread: sleep until the next camera's sample is due (woken by new images)."""
        now = time.monotonic()
        waits = [0.5]
        if self._ready_count() < self.max_ready:
            period = self._period()
            for cam in self.slots.cameras:
                if self.slots.has_fresh(cam):
                    waits.append(self._last_sample[cam] + period - now)
        return max(0.001, min(waits))

    def _ready_count(self) -> int:
        with self._ready_lock:
            return len(self._ready)

    def _encode_frames(self) -> bool:
        worked = False
        period = self._period()
        for cam in self.slots.cameras:
            if self._stop.is_set() or self._ready_count() >= self.max_ready:
                break  # the model thread is behind: the slot keeps only the newest frame
            now = time.monotonic()
            if now < self._last_sample[cam] + period or not self.slots.has_fresh(cam):
                continue
            epoch = self._epoch
            sample = self.slots.take_sample(cam)
            if sample is None:
                continue
            msg, generation = sample
            self._last_sample[cam] = now
            worked = True
            t0 = time.monotonic()
            try:
                chunk, ref = self.make_chunk(cam, msg)
            except ValueError as exc:
                self._bad_frame(cam, str(exc), generation)
                continue
            self.timing["encode_s"] = _ewma(self.timing.get("encode_s"), time.monotonic() - t0)
            with self._ready_lock:
                if epoch == self._epoch:
                    self._ready.append((cam, chunk, ref, generation))
            self._wake.set()
        return worked

    # -- frames: the model thread -----------------------------------------------------

    def _append_frames(self) -> bool:
        """Append the encoded frames waiting now (at most ``max_ready``), oldest first; True if
        there was one. It yields to a question after the first append, so a question waits
        for at most one frame's append, and frames for at most one answer."""
        with self._ready_lock:
            waiting = len(self._ready)
        worked = False
        for _ in range(waiting):
            if self._stop.is_set() or (worked and self.jobs.pending()):
                break
            with self._ready_lock:
                if not self._ready:  # cleared by a reset
                    break
                cam, chunk, ref, generation = self._ready.popleft()
            self._encoder_wake.set()  # room for the next frame
            worked = True
            self.activity = "frame"
            t0 = time.monotonic()
            try:
                self.stream.append_chunk(chunk, should_stop=self._stop.is_set)
            except Cancelled:  # stopping: the pieces already appended stay, the frame is not counted
                break
            except Exception as exc:  # counted, then reported by the serving loop
                self.slots.mark_bad(cam, f"the model could not append it: {type(exc).__name__}: "
                                    f"{exc}", generation)
                raise
            self.timing["append_s"] = _ewma(self.timing.get("append_s"), time.monotonic() - t0)
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
            self.slots.mark_encoded(cam, generation)
            self._frames_since_scene += 1
        return worked

    def _bad_frame(self, cam: str, reason: str, generation: Optional[int] = None) -> None:
        self.slots.mark_bad(cam, reason, generation)
        now = time.monotonic()
        if now - self._bad_logged.get(cam, -1e9) > 5.0:  # at most one warning per 5 s
            self._bad_logged[cam] = now
            quiet = self._bad_unlogged.pop(cam, 0)
            more = (f" ({quiet} more skipped without a warning in the 5 s before; all are counted "
                    "in /diagnostics, 'bad')") if quiet else ""
            self.log.warning(f"camera '{cam}': skipping a frame that cannot be used: {reason}{more}")
        else:
            self._bad_unlogged[cam] = self._bad_unlogged.get(cam, 0) + 1

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
                with self._ready_lock:
                    self._epoch += 1
                    self._ready.clear()
                self.stream.reset()
                if self.on_reset is not None:
                    self.on_reset()
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
