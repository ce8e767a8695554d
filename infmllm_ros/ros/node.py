"""``infmllm``: watch cameras for hours, answer questions about what they showed.

A thin node around the engine's :class:`~infmllm_ros.engine.Stream`:

* one subscription per camera (``sensor_msgs/Image`` or ``CompressedImage``,
  sensor-data QoS) whose callback only stores the latest message
  (:class:`~.core.FrameSlots`);
* one worker thread (:class:`~.worker.StreamWorker`) that owns the stream: it
  samples each camera at ``sample_rate_hz``, encodes and appends the frame,
  answers questions between frames and writes a scene description every
  ``scene.period_s``;
* ``~/query`` (infmllm_ros/srv/Query) and the ``~/ask`` action (streamed
  partial answers, cancel) in their own reentrant callback group, handing jobs
  to the worker through a bounded :class:`~.core.JobQueue`;
* ``~/reset`` (std_srvs/Trigger), ``~/get_stats`` (infmllm_ros/srv/GetStats),
  ``~/scene`` (infmllm_ros/msg/SceneDescription) and ``/diagnostics``;
* ``~/debug_image`` (sensor_msgs/Image): each encoded frame with the offline
  describer's boxes, class and track id drawn, stamped like the frame it comes
  from; drawn only while someone subscribes;
* ``memory.state_file`` (:mod:`.state`): the memory loaded at start-up, saved
  atomically every ``memory.save_period_s``, at a clean shutdown and on
  ``~/save``; ``~/load`` restores it on demand (std_srvs/Trigger both).

Parameters are all in :mod:`infmllm_ros.ros.params`. Shutdown order: stop the
worker (the running answer stops between tokens), shut the executor down,
destroy the node, ``rclpy.try_shutdown()``.
"""

from __future__ import annotations

import os

# No progress bars in the node process: under launch they come out as empty lines. Set
# before transformers imports tqdm, which reads TQDM_* once (its GGUF loader calls tqdm
# directly, past transformers' own disable_progress_bar()).
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import sys
import threading
import time
from typing import Any, Optional, Tuple

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from infmllm_ros.action import Ask
from infmllm_ros.msg import SceneDescription
from infmllm_ros.srv import GetStats, Query

from .core import FrameRef, Job, JobQueue, FrameSlots, sec_to_stamp
from .health import SimClockWatch
from .params import (
    DEFAULT_NODE_NAME,
    STATIC_BY_NAME,
    NodeSettings,
    ParameterError,
    declare_node_parameters,
    params_file_problem,
    unmatched_params_files,
)
from .state import StateFile
from .worker import AnswerResult, StreamWorker

#: QoS of the node's services and action: reliable, KEEP_ALL. The default service
#: profile keeps the last 10 requests (and responses), so a burst of more than
#: 10 simultaneous calls silently lost requests before the executor took them
#: (issue #15 item 9: 6-10 of 20 clients never got a response). KEEP_ALL keeps
#: every request until it is taken and every response until it is delivered.
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)


def to_time(ref: Optional[FrameRef]) -> Time:
    """A FrameRef's exact stamp as builtin_interfaces/Time (zero for None)."""
    return Time() if ref is None else Time(sec=ref.sec, nanosec=ref.nanosec)


def float_to_time(t: Optional[float]) -> Time:
    sec, ns = sec_to_stamp(t)
    return Time(sec=sec, nanosec=ns)


def load_for_settings(settings: NodeSettings):
    """Load the model named by ``model.*`` (the engine's one loader)."""
    from infmllm_ros.engine import load_model

    m = settings.model
    return load_model(m.name, gguf_file=m.gguf_file or None, device=m.device, dtype=m.dtype,
                      trust_remote_code=m.trust_remote_code, quantize=m.quantize)


def check_before_load(settings: NodeSettings, *, model: bool = True) -> None:
    """Checks that need no weights: ``memory.state_file``'s folder and (``model``) the
    ``model.*`` folder, GGUF file, device and quantisation on that device; ParameterError."""
    from infmllm_ros.engine.models import check_model_source, check_quantize, resolve_device, resolve_dtype

    if settings.memory.state_file:
        problem = StateFile(settings.memory.state_file).problem()
        if problem:
            raise ParameterError(f"memory.state_file: {problem}")
    if not model:
        return
    m = settings.model

    def quantize_check():
        device = resolve_device(m.device)
        check_quantize(m.quantize, device, resolve_dtype(m.dtype, device), setting="model.quantize")

    for name, check in (("model.name", lambda: check_model_source(m.name, m.gguf_file or None)),
                        ("model.device", lambda: resolve_device(m.device)),
                        ("model.quantize", quantize_check)):
        try:
            check()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ParameterError(str(exc) if name == "model.quantize" else f"{name}: {exc}") from None


def build_encoder(lm, settings: NodeSettings):
    """The frame encoder named by ``encoder.type`` (perception/encoders.py).

    The encoder runs in the worker's encoder thread beside the model thread, so it
    gets its own copy of the tokenizer and processor: a Hugging Face fast tokenizer
    used from two threads at once can fail ("Already borrowed").
    """
    import copy
    import dataclasses

    from infmllm_ros.perception.encoders import make_encoder

    lm = dataclasses.replace(lm, tokenizer=copy.deepcopy(lm.tokenizer),
                             processor=copy.deepcopy(lm.processor))
    e = settings.encoder
    offline = {}
    if e.type == "offline":
        from infmllm_ros.perception.tracking import TrackerConfig

        offline = dict(detector=e.detector.detector_config(),
                       tracker=TrackerConfig(frame_rate=settings.sample_rate_hz, lost_s=e.tracker.lost_s,
                                             match_buffer=e.tracker.match_buffer))
    return make_encoder(e.type, lm, image_size=e.image_size, max_pixels=e.max_pixels,
                        min_pixels=e.min_pixels, **offline)


class InfMllmNode(Node):
    """The streaming perception node; see the module docstring.

    Args:
        node_name: ROS node name (default ``infmllm``).
        loaded_model: an already loaded ``LoadedModel`` to use instead of loading
            ``model.*`` (tests share one across nodes).
        **kwargs: passed to :class:`rclpy.node.Node` (``context``, ``namespace``,
            ``cli_args``, ``parameter_overrides`` ...).

    Raises:
        ParameterError: a parameter value the node cannot start with.
    """

    def __init__(self, node_name: str = DEFAULT_NODE_NAME, *, loaded_model=None, **kwargs: Any):
        super().__init__(node_name, **kwargs)
        self._closed = False
        self._calls = _Counter()  # ~/query and ~/ask callbacks in progress (see drain)
        #: At shutdown, how long a running answer may take to stop before its caller is told.
        self.stop_grace_s = 1.0
        self._started_at = time.monotonic()
        self.worker: Optional[StreamWorker] = None
        self.state: Optional[StateFile] = None
        self._save_timer = None
        try:
            self.settings, self._params = declare_node_parameters(self, self._on_settings)
            self._warn_unmatched_params_files(list(kwargs.get("cli_args") or []) + sys.argv)
            self._start(loaded_model)
        except BaseException:
            self.shutdown()
            super().destroy_node()
            raise

    # -- start-up -------------------------------------------------------------------

    def _warn_unmatched_params_files(self, args) -> None:
        for path, keys in unmatched_params_files(args, self.get_fully_qualified_name()):
            self.get_logger().warning(
                f"params file {path} has no section for this node "
                f"({self.get_fully_qualified_name()}; its sections: {keys}), so none of its "
                "values apply: key it '/**:' or by this node's name")

    def _start(self, loaded_model) -> None:
        from infmllm_ros.engine import Stream
        from infmllm_ros.engine.int4 import int4_kernels

        s = self.settings
        log = self.get_logger()
        t0 = time.monotonic()
        if s.model.num_threads:
            import torch

            torch.set_num_threads(s.model.num_threads)
        check_before_load(s, model=loaded_model is None)  # fails now, not after a 30-50 s load
        loaded_here = loaded_model is None
        if loaded_here:
            log.info(f"loading model '{s.model.name}' (device {s.model.device}, dtype "
                     f"{s.model.dtype}) ...")
            try:
                loaded_model = load_for_settings(s)
            except (OSError, ValueError, ImportError) as exc:  # not found, no hub, bad weights
                raise ParameterError(f"model.name '{s.model.name}' could not be loaded: "
                                     + " ".join(str(exc).split())) from None
            how = f"loaded in {time.monotonic() - t0:.1f} s"
        else:
            how = "already loaded"
        self.lm = loaded_model
        try:
            self.stream = Stream(self.lm, s.stream_config())
            self.encoder = build_encoder(self.lm, s)
        except ValueError as exc:  # a budget the model cannot use, an unusable detector file ...
            raise ParameterError(str(exc)) from None
        describer = getattr(self.encoder, "describer", None)
        detector = f" ({describer.detector.description})" if describer is not None else ""
        log.info(
            f"model '{self.lm.name}' ({self.lm.kind}) on {self.lm.device}, {self.lm.dtype}"
            f", {self.lm.quantize if self.lm.quantize != 'none' else 'float'} weights"
            f"{' (' + '/'.join(int4_kernels(self.lm.model)) + ' kernel)' if self.lm.quantize == 'int4' else ''}"
            f"{' (model.quantize auto)' if s.model.quantize == 'auto' and loaded_here else ''} ({how}); "
            f"encoder {s.encoder.type}{detector}; cache policy {s.cache.policy}, budget "
            f"{self.stream.budget} tokens, at most {self.stream.capacity or 'unbounded'} held"
            + (f" / {s.cache.budget_bytes} bytes" if s.cache.budget_bytes else ""))
        compiled_s = self.stream.warmup()
        log.info(f"decode step: compiled in {compiled_s:.1f} s (model.compile {s.model.compile})"
                 if compiled_s is not None else
                 f"decode step: eager (model.compile {s.model.compile} on {self.lm.device.type}"
                 + (f"; compiling failed: {self.stream.compile_error})" if self.stream.compile_error
                    else ")")
                 + (", decoder layers walked directly" if self.stream.decode_path == "direct" else
                    f", through the model's forward ({self.stream.direct_decode_unsupported})"))

        self.max_answer_tokens = max(1, self.stream.max_answer_tokens)

        self.slots = FrameSlots(s.camera_names, on_put=self._wake_worker)
        self.jobs = JobQueue(s.query.queue_size, s.query.busy_policy, on_submit=self._wake_worker)
        self.worker = StreamWorker(self.stream, self.slots, self.jobs, self._make_chunk, s,
                                   on_scene=self._publish_scene, logger=log,
                                   on_reset=getattr(self.encoder, "reset", None))
        self.worker.max_answer_tokens = self.max_answer_tokens
        self.state = self._load_state_file(s)
        self.worker.state = self.state

        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self._query_group = ReentrantCallbackGroup()
        self._admin_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

        # Transient local, depth 1: a late subscriber gets the last description at once.
        self.scene_pub = self.create_publisher(SceneDescription, "~/scene", QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        # Reliable, depth 1: matches best-effort and reliable viewers (rqt_image_view, RViz) alike.
        self.debug_pub = self.create_publisher(Image, "~/debug_image", QoSProfile(depth=1))
        self.debug_images_published = 0
        self._debug_failed = False
        self._subs = []
        self._topics: dict = {}  # camera -> its topic, resolved in the node's namespace
        self._qos_events: dict = {c: 0 for c in s.camera_names}
        self.create_service(Query, "~/query", self._counted(self._on_query), qos_profile=SERVICE_QOS,
                            callback_group=self._query_group)
        self.create_service(Trigger, "~/reset", self._on_reset, qos_profile=SERVICE_QOS,
                            callback_group=self._admin_group)
        self.create_service(Trigger, "~/save", self._on_save, qos_profile=SERVICE_QOS,
                            callback_group=self._admin_group)
        self.create_service(Trigger, "~/load", self._on_load, qos_profile=SERVICE_QOS,
                            callback_group=self._admin_group)
        self.create_service(GetStats, "~/get_stats", self._on_get_stats, qos_profile=SERVICE_QOS,
                            callback_group=self._admin_group)
        self._ask_server = ActionServer(
            self, Ask, "~/ask", execute_callback=self._counted(self._execute_ask),
            goal_callback=self._on_ask_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
            cancel_service_qos_profile=SERVICE_QOS, callback_group=self._query_group)
        self._diag_timer = None
        self._clock_watch = SimClockWatch(self)
        self._make_diag_timer(s.diagnostics_period_s)
        self._save_timer = None
        self._save_job: Optional[Job] = None
        self._make_save_timer(s.memory.save_period_s)
        self._started_at = time.monotonic()  # cameras are silent "since start-up" from here
        self.worker.start()
        # Subscribed last: a publisher that waits for this subscription (infmllm-replay,
        # launch) starts once the model is loaded and the worker runs.
        for cam in s.cameras:
            self._subscribe(cam)
        log.info(f"ready: {len(s.cameras)} camera(s) at {s.sample_rate_hz:g} Hz; scene every "
                 + (f"{s.scene.period_s:g} s" if s.scene.period_s > 0 else "(off)")
                 + f"; queries {s.query.busy_policy} (queue {s.query.queue_size})")

    def _subscribe(self, cam) -> None:
        """The subscription of one camera, with its transport and QoS reliability."""
        msg_type = CompressedImage if cam.transport == "compressed" else Image
        qos = qos_profile_sensor_data
        if cam.reliability == "reliable":
            qos = QoSProfile(depth=qos_profile_sensor_data.depth,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._subs.append(self.create_subscription(
            msg_type, cam.topic, lambda msg, name=cam.name: self._on_image(name, msg), qos,
            callback_group=self._sensor_group,
            event_callbacks=SubscriptionEventCallbacks(
                incompatible_qos=lambda info, cam=cam: self._on_incompatible_qos(cam, info))))
        self._topics[cam.name] = self._subs[-1].topic_name
        self.get_logger().info(f"camera '{cam.name}': {self._topics[cam.name]} "
                               f"({msg_type.__name__}, {cam.reliability})")

    def _on_image(self, camera: str, msg) -> None:
        st = msg.header.stamp
        self.slots.put(camera, msg, st.sec + st.nanosec * 1e-9)

    def _on_incompatible_qos(self, cam, info) -> None:
        self._qos_events[cam.name] = self._qos_events.get(cam.name, 0) + 1
        self.get_logger().warning(
            f"camera '{cam.name}': a publisher on {cam.topic} offers a QoS this subscription "
            f"cannot match ({info.last_policy_kind.name}); with cameras.{cam.name}.reliability "
            "'reliable' only reliable publishers are received")

    def executor_threads(self) -> int:
        """Threads a MultiThreadedExecutor needs so waiting questions never starve the rest.

        A ~/query or ~/ask callback holds its thread until the answer, a refusal or
        ``query.timeout_s``; at most ``query.queue_size`` + 1 do so at once (the rest
        are refused at once). ``query.queue_size`` can be raised live, so the pool is
        sized for its upper bound; its threads start only when needed (a
        ThreadPoolExecutor grows on demand), so the size costs nothing idle. Four
        more keep images, timers, ~/get_stats, ~/reset and refusals moving.
        """
        most_waiting = int(STATIC_BY_NAME["query.queue_size"].hi)
        return most_waiting + 1 + 4

    # -- parameters --------------------------------------------------------------

    def _on_settings(self, s: NodeSettings) -> None:
        old = self.settings
        self.settings = s
        if self.worker is not None:
            self.worker.settings = s
            self.jobs.configure(s.query.queue_size, s.query.busy_policy)
            if s.diagnostics_period_s != old.diagnostics_period_s:
                self._make_diag_timer(s.diagnostics_period_s)
            if s.memory.save_period_s != old.memory.save_period_s:
                self._make_save_timer(s.memory.save_period_s)
            self._wake_worker()

    def _make_diag_timer(self, period: float) -> None:
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        if period > 0:
            # On the steady clock: with use_sim_time and no /clock, a ROS-time timer never fires.
            self._diag_timer = self.create_timer(period, self._publish_diagnostics,
                                                 callback_group=self._timer_group,
                                                 clock=Clock(clock_type=ClockType.STEADY_TIME))

    # -- frames ------------------------------------------------------------------

    def _wake_worker(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def _make_chunk(self, camera: str, msg) -> Tuple[Any, FrameRef]:
        """Worker side: message -> RGB -> chunk (ValueError for an unusable frame)."""
        from .images import image_msg_to_rgb

        st = msg.header.stamp
        sec, ns = st.sec, st.nanosec
        if sec == 0 and ns == 0:  # unstamped driver: use the time we handle it
            sec, ns = self.get_clock().now().seconds_nanoseconds()
        cam = self.settings.camera(camera)
        ref = FrameRef(camera, int(sec), int(ns), (cam.frame_id if cam else "") or msg.header.frame_id)
        rgb = image_msg_to_rgb(msg)
        chunk = self.encoder.encode(rgb, camera, ref.seconds)
        self._publish_debug_image(rgb, ref)
        return chunk, ref

    def _publish_debug_image(self, rgb, ref: FrameRef) -> None:
        """``~/debug_image``: the frame just encoded with its objects drawn, stamped like it
        (``ref``: its stamp and frame_id). Only while someone subscribes: drawing and
        publishing a full frame costs a few ms, the node's own work does not need it."""
        obs = getattr(self.encoder, "last_observation", None)
        if obs is None or self._closed or self.debug_pub.get_subscription_count() == 0:
            return
        try:
            from infmllm_ros.perception.draw import draw_observation

            from .images import rgb_to_image_msg

            msg = rgb_to_image_msg(draw_observation(rgb, obs), (ref.sec, ref.nanosec), ref.frame_id)
        except Exception as exc:  # noqa: BLE001 - a debug view must never cost a frame
            if not self._debug_failed:
                self._debug_failed = True
                self.get_logger().warning(f"~/debug_image: drawing failed: {type(exc).__name__}: {exc}")
            return
        self._safe_publish(self.debug_pub, msg)
        self.debug_images_published += 1

    # -- scene -------------------------------------------------------------------

    def _publish_scene(self, res: AnswerResult) -> None:
        st = res.stats
        m = SceneDescription()
        if res.newest is not None:
            m.header.stamp = to_time(res.newest)
            m.header.frame_id = res.newest.frame_id
        m.camera = res.camera
        m.text = res.answer.text.strip()
        m.oldest_frame_stamp = to_time(res.oldest)
        m.newest_frame_stamp = to_time(res.newest)
        m.frames_encoded = min(self.slots.totals().encoded, 2**32 - 1)
        m.cache_tokens = int(st.tokens_held)
        m.cache_bytes = int(st.bytes_held)
        m.policy = st.policy
        m.cache_budget_tokens = int(st.budget_tokens)
        m.cache_capacity_tokens = int(st.capacity_tokens)
        self._safe_publish(self.scene_pub, m)
        self.get_logger().info(f"scene ({m.header.stamp.sec}.{m.header.stamp.nanosec:09d}): {m.text}")

    def _safe_publish(self, pub, msg) -> None:
        if self._closed or not self.context.ok():
            return
        try:
            pub.publish(msg)
        except Exception as exc:  # noqa: BLE001 - context torn down under us at shutdown
            if not self._closed:
                self.get_logger().warning(f"publish failed: {exc}")

    # -- questions ---------------------------------------------------------------

    def check_question(self, question: str, camera: str,
                       max_new_tokens: int = 0) -> Optional[str]:
        """Why a question is refused before it reaches the model, or None."""
        q = self.settings.query
        if not question or not question.strip():
            return "empty question: ask something"
        if len(question) > q.max_question_chars:
            return (f"question too long: {len(question)} characters, the limit is "
                    f"{q.max_question_chars} (query.max_question_chars)")
        if camera and camera not in self.settings.camera_names:
            return f"unknown camera '{camera}': known cameras are {self.settings.camera_names}"
        # In tokens: a question that would push the frames out of the cache is refused here,
        # before it waits in the queue.
        n = int(max_new_tokens) or q.max_new_tokens
        return self.stream.check_question(question, min(n, self.max_answer_tokens))

    def _submit_question(self, question: str, camera: str, max_new_tokens: int,
                         on_text=None) -> Tuple[Optional[Job], Optional[str]]:
        reason = self.check_question(question, camera, max_new_tokens)
        if reason:
            return None, reason
        n = int(max_new_tokens) or self.settings.query.max_new_tokens
        job = Job("query", question=question.strip(), camera=camera,
                  max_new_tokens=min(n, self.max_answer_tokens),
                  timeout_s=self.settings.query.timeout_s)
        job.on_text = on_text
        # Said in the reply's message, so that a caller who asked for more knows why it stopped.
        job.note = (f"max_new_tokens {n} is more than an answer may take here; limited to "
                    f"{self.max_answer_tokens} (the cache keeps room for that many)"
                    if n > self.max_answer_tokens else "")
        reason = self.jobs.submit(job)
        return (None, reason) if reason else (job, None)

    def _fill_answer(self, resp, job: Job, t0: float):
        """The response for ``job``: its answer, its error, or the timeout (with any partial answer)."""
        resp.latency_s = float(time.monotonic() - t0)
        if not job.done:
            job.cancel()  # the worker stops it between prefill pieces / tokens
            resp.success, resp.message = False, job.timeout_reason()
            return resp
        if job.error:
            resp.success, resp.message = False, job.error
            return resp
        res: AnswerResult = job.result
        a = res.answer
        resp.answer = a.text.strip()
        resp.oldest_frame_stamp = to_time(res.oldest)
        resp.newest_frame_stamp = to_time(res.newest)
        resp.prompt_tokens = int(a.prompt_tokens)
        resp.generated_tokens = int(a.generated_tokens)
        resp.success = not a.cancelled
        resp.message = job.note
        if a.cancelled:
            if self._closed:
                resp.message = "stopped: the node is shutting down (partial answer)"
            elif job.expired:
                resp.message = job.timeout_reason() + " (partial answer)"
            else:
                resp.message = "cancelled (partial answer)"
        return resp

    def _counted(self, callback):
        """``callback`` counted in :attr:`_calls` while it runs (see :meth:`drain`)."""

        def counted(*args):
            with self._calls:
                return callback(*args)

        return counted

    def _on_query(self, req: Query.Request, resp: Query.Response) -> Query.Response:
        t0 = time.monotonic()
        job, reason = self._submit_question(req.question, req.camera, req.max_new_tokens)
        if job is None:
            resp.success, resp.message = False, reason
            self.get_logger().info(f"query refused: {reason}")
            return resp
        # The worker finishes it, refuses it or stops it at its deadline (query.timeout_s).
        if not self._wait_job(job, job.deadline) and self._closed:
            job.cancel()
            resp.success, resp.message = False, "the node is shutting down"
            resp.latency_s = float(time.monotonic() - t0)
            return resp
        resp = self._fill_answer(resp, job, t0)
        if not resp.success:
            self.get_logger().info(f"query not answered: {resp.message}")
        return resp

    def _wait_job(self, job: Job, deadline: float, cancelled=None) -> bool:
        """Wait for ``job`` until ``deadline`` (monotonic) or ``cancelled()``; True when done.

        Once the node is shutting down the worker has ``stop_grace_s`` to finish it (an
        answer stops at its next token), so every caller gets its reply before the executor
        stops, even when the worker is stuck in a long step.
        """
        closed_at = None
        while not job.wait(0.05):
            now = time.monotonic()
            if now > deadline or (cancelled is not None and cancelled()):
                return False
            if self._closed:
                closed_at = closed_at or now
                if now - closed_at > self.stop_grace_s:
                    return False
        return True

    def _on_ask_goal(self, goal) -> GoalResponse:
        reason = self.check_question(goal.question, goal.camera, goal.max_new_tokens)
        if reason:
            self.get_logger().info(f"ask goal rejected: {reason}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _execute_ask(self, goal_handle):
        t0 = time.monotonic()
        g = goal_handle.request
        partial = {"text": "", "n": 0}

        def on_text(piece: str) -> None:
            partial["text"] += piece
            partial["n"] += 1
            if not self._closed:
                try:
                    goal_handle.publish_feedback(Ask.Feedback(partial_text=partial["text"],
                                                              generated_tokens=partial["n"]))
                except Exception:  # noqa: BLE001 - goal gone / shutting down
                    pass

        result = Ask.Result()
        job, reason = self._submit_question(g.question, g.camera, g.max_new_tokens, on_text)
        if job is None:
            result.success, result.message = False, reason
            self._finish_goal(goal_handle.abort)
            return result
        if not self._wait_job(job, job.deadline, lambda: goal_handle.is_cancel_requested):
            job.cancel()
            if not self._closed and goal_handle.is_cancel_requested:
                job.wait(5.0)
        if job.done or not self._closed:
            self._fill_answer(result, job, t0)  # the answer, or the timeout with its reason
        else:
            result.success, result.message = False, "the node is shutting down"
        if goal_handle.is_cancel_requested:
            result.success = False
            result.message = "cancelled (partial answer)"
            if not result.answer:
                result.answer = partial["text"].strip()
            self._finish_goal(goal_handle.canceled)
        elif result.success:
            self._finish_goal(goal_handle.succeed)
        else:
            self._finish_goal(goal_handle.abort)
        return result

    def _finish_goal(self, transition) -> None:
        """Move a goal to its final state; at Ctrl-C the context may already be gone, which is fine."""
        try:
            transition()
        except Exception:  # noqa: BLE001 - rclpy raises RCLError once the context is shut down
            if self._closed or not self.context.ok():
                return
            raise

    # -- admin -------------------------------------------------------------------

    def _control(self, kind: str, **args) -> Tuple[Optional[Job], Optional[str]]:
        """Run a control job (reset, save, load) on the worker; the job and why it failed."""
        job = Job(kind, control=True, **args)
        reason = self.jobs.submit(job)
        if reason is None and not job.wait(self.settings.query.timeout_s):
            job.cancel()
            reason = "timed out waiting for the worker"
        if reason is None and job.error:
            reason = job.error
        return job, reason

    def _on_reset(self, req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        before = self.worker.stats.tokens_held
        _, reason = self._control("reset")
        resp.success = reason is None
        resp.message = reason or f"cache cleared ({before} tokens dropped)"
        self.get_logger().info(f"reset: {resp.message}")
        return resp

    # -- memory across restarts ------------------------------------------------------

    def _load_state_file(self, s: NodeSettings) -> Optional[StateFile]:
        """Start-up: restore the memory from ``memory.state_file`` if it is there and matches."""
        if not s.memory.state_file:
            return None
        log = self.get_logger()
        state = StateFile(s.memory.state_file)
        for name in state.remove_leftovers():
            log.warning(f"removed {name}, left by a save that was interrupted")
        res = state.load(self.stream, set_aside=True)
        if res.loaded:
            self.worker.book.restore(list(res.refs))
            self.worker.stats = self.stream.stats()
            log.info(f"memory: {res.reason}")
        elif res.set_aside:
            log.warning(f"memory: {res.reason}; starting with an empty memory")
        else:
            log.info(f"memory: {res.reason}; starting with an empty memory")
        return state

    def _make_save_timer(self, period: float) -> None:
        if self._save_timer is not None:
            self.destroy_timer(self._save_timer)
            self._save_timer = None
        if period > 0 and self.state is not None:
            self._save_timer = self.create_timer(period, self._periodic_save,
                                                 callback_group=self._timer_group)

    def _periodic_save(self) -> None:
        if self._save_job is None or self._save_job.done:  # never pile saves up behind a slow disk
            self._save_job = Job("save", control=True, force=False)
            if self.jobs.submit(self._save_job) is not None:
                self._save_job = None

    def _on_save(self, req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        if self.state is None:
            resp.success, resp.message = False, "memory.state_file is not set: nowhere to save"
            return resp
        job, reason = self._control("save", force=True)
        resp.success = reason is None
        if reason is None:
            r = job.result
            resp.message = f"saved {r.bytes} bytes to {r.path} in {r.seconds:.2f} s"
        else:
            resp.message = f"not saved: {reason}"
        self.get_logger().info(f"save: {resp.message}")
        return resp

    def _on_load(self, req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        if self.state is None:
            resp.success, resp.message = False, "memory.state_file is not set: nothing to load"
            return resp
        job, reason = self._control("load")
        resp.success = reason is None
        resp.message = reason or job.result.reason
        self.get_logger().info(f"load: {resp.message}")
        return resp

    def _save_on_shutdown(self) -> None:
        """A clean shutdown keeps the memory (the worker has stopped: the stream is free)."""
        if getattr(self, "state", None) is None:
            return
        try:
            r = self.state.save(self.stream, self.worker.book.refs(), force=False)
            self.get_logger().info(f"memory: {'unchanged in' if r.skipped else 'saved to'} {r.path}")
        except Exception as exc:  # noqa: BLE001 - the previous file is intact; say why
            self.get_logger().error(f"memory: could not save to {self.state.path}: {exc}")

    def cache_budget_bytes(self) -> int:
        """Bytes the cache may ever hold, room for a chunk and an answer included (0: unbounded)."""
        return int(self.worker.stats.budget_bytes)

    def _on_get_stats(self, req, resp: GetStats.Response) -> GetStats.Response:
        st = self.worker.stats
        t = self.slots.totals()
        resp.success = self.worker.alive
        resp.message = "" if self.worker.alive else f"worker stopped: {self.worker.error or 'shutdown'}"
        resp.policy = st.policy
        resp.cache_tokens = int(st.tokens_held)
        resp.cache_budget_tokens = int(st.budget_tokens)
        resp.cache_capacity_tokens = int(st.capacity_tokens)
        resp.cache_bytes = int(st.bytes_held)
        resp.cache_budget_bytes = self.cache_budget_bytes()
        resp.tokens_seen = int(st.tokens_seen)
        resp.tokens_evicted = int(st.evictions)
        resp.frames_received = t.received
        resp.frames_encoded = t.encoded
        resp.frames_dropped = t.dropped
        resp.frames_bad = t.bad
        resp.frames_pending = t.pending
        resp.oldest_frame_stamp = to_time(self.worker.book.lookup(st.oldest_stamp))
        resp.newest_frame_stamp = to_time(self.worker.book.lookup(st.newest_stamp))
        resp.next_position = int(st.next_position)
        return resp

    # -- diagnostics ---------------------------------------------------------------

    def diagnostics(self) -> DiagnosticArray:
        """The node's DiagnosticArray: one status per camera and one for the stream."""
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        hw = self.get_fully_qualified_name()  # unique per node, also across namespaces
        period = 1.0 / self.settings.sample_rate_hz
        stale_s = self.settings.diagnostics_stale_periods * period
        dead_s = self.settings.diagnostics_dead_periods * period
        up_s = time.monotonic() - self._started_at
        for name, c in self.slots.counts().items():
            cam = self.settings.camera(name)
            s = DiagnosticStatus(name=f"{hw}: camera {name}", hardware_id=hw)
            if c.silent_s is None:
                s.level = DiagnosticStatus.ERROR if up_s > dead_s else DiagnosticStatus.WARN
                s.message = f"no images received in {up_s:.1f} s since start-up"
            elif c.silent_s > dead_s:
                s.level, s.message = DiagnosticStatus.ERROR, f"dead: no image for {c.silent_s:.1f} s"
            elif c.silent_s > stale_s:
                s.level, s.message = DiagnosticStatus.WARN, f"stale: no image for {c.silent_s:.1f} s"
            elif c.bad and c.bad >= c.encoded:
                s.level, s.message = DiagnosticStatus.WARN, f"unusable images: {c.last_error}"
            elif c.lost_fraction > 0.5:
                s.level = DiagnosticStatus.WARN
                s.message = (f"receiving, but about {100 * c.lost_fraction:.0f}% of the camera's "
                             "frames are lost before they reach the node (large frames over "
                             "best-effort QoS: see README, 'Large frames')")
            else:
                s.level, s.message = DiagnosticStatus.OK, "receiving"
            s.values = _kv(topic=self._topics.get(name, cam.topic if cam else ""),
                           received=c.received, dropped=c.dropped, encoded=c.encoded, bad=c.bad,
                           pending=c.pending,
                           frames_lost_estimate=c.lost_estimate,
                           lost_fraction_recent=f"{c.lost_fraction:.2f}",
                           camera_hz_estimate=f"{c.camera_hz:.2f}",
                           received_hz=f"{c.received_hz:.2f}", encoded_hz=f"{c.encoded_hz:.2f}",
                           target_hz=f"{1.0 / period:.2f}",
                           reliability=cam.reliability if cam else "",
                           incompatible_qos_events=self._qos_events.get(name, 0),
                           last_error=c.last_error,
                           seconds_since_last_image=("" if c.silent_s is None
                                                     else f"{c.silent_s:.2f}"))
            arr.status.append(s)
        clock_problem = self._clock_watch.problem()
        if clock_problem:
            arr.status.append(DiagnosticStatus(name=f"{hw}: clock", hardware_id=hw,
                                               level=DiagnosticStatus.WARN,
                                               message=clock_problem))
        st = self.worker.stats
        lat = self.worker.latency
        s = DiagnosticStatus(name=f"{hw}: stream", hardware_id=hw)
        if not self.worker.alive and not self._closed:
            s.level, s.message = DiagnosticStatus.ERROR, f"worker stopped: {self.worker.error}"
        elif self.worker.error:
            s.level, s.message = DiagnosticStatus.WARN, f"last error: {self.worker.error}"
        else:
            s.level, s.message = DiagnosticStatus.OK, f"{st.tokens_held} tokens held"
        s.values = _kv(model=self.lm.name, device=str(self.lm.device), dtype=str(self.lm.dtype),
                       policy=st.policy, cache_tokens=st.tokens_held,
                       cache_budget_tokens=st.budget_tokens,
                       cache_capacity_tokens=st.capacity_tokens, cache_bytes=st.bytes_held,
                       cache_bytes_reserved=st.bytes_reserved,
                       cache_budget_bytes=self.cache_budget_bytes(), tokens_seen=st.tokens_seen,
                       tokens_evicted=st.evictions, frames_in_stream=st.frames_seen,
                       queries_answered=lat.count, queries_refused=self.jobs.refused,
                       queries_waiting=self.jobs.pending(),
                       query_latency_last_s=f"{lat.last_s:.3f}",
                       query_latency_mean_s=f"{lat.mean_recent_s:.3f}",
                       scenes_published=self.worker.scenes_published,
                       worker_activity=self.worker.activity,
                       **{k: f"{v:.3f}" for k, v in self.worker.timing.items()})
        arr.status.append(s)
        return arr

    def _publish_diagnostics(self) -> None:
        self._safe_publish(self.diag_pub, self.diagnostics())

    # -- shutdown ----------------------------------------------------------------

    def shutdown(self, timeout: float = 20.0) -> bool:
        """Stop the worker and join it; idempotent. True when it has stopped.

        The answer or prefill in progress stops at its next token or piece,
        waiting questions are refused ("the node is shutting down") and their
        callers, ``~/ask`` goals included, get that reply while the executor
        still spins (see :meth:`drain`).
        """
        if self._closed:
            return self.worker is None or not self.worker.alive
        self._closed = True
        self._closed_at = time.monotonic()
        if self.worker is None:
            return True
        t = self.slots.totals()
        self.get_logger().info(
            f"stopping after {t.received} frames received, {t.encoded} encoded, "
            f"{self.worker.latency.count} questions answered")
        if self.jobs.busy:
            self.get_logger().info("stopping: cancelling the answer in progress")
        if self.worker.stop(timeout):
            self._save_on_shutdown()
            self.stream.close()  # give the (maybe shared) model its own attention back
            return True
        self.get_logger().warning(
            f"the worker is still inside one step after {timeout:g} s (a frame's encoding or a "
            "prefill piece on a busy machine); not waiting for it")
        return False

    def drain(self, timeout: float = 1.0) -> None:
        """After :meth:`shutdown`: wait until every ~/query and ~/ask callback has returned,
        then a moment more for the executor to send their replies (action results are sent
        by a task that runs after the callback)."""
        end = time.monotonic() + timeout
        # A callback that returned since the stop began (while the worker was joined) has its
        # reply still to send, as much as one that is still running.
        had_calls = (self._calls.value > 0
                     or self._calls.last_exit >= getattr(self, "_closed_at", float("inf")))
        while self._calls.value > 0 and time.monotonic() < end:
            time.sleep(0.02)
        if had_calls:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def destroy_node(self) -> None:
        self.shutdown()
        if getattr(self, "_ask_server", None) is not None:
            self._ask_server.destroy()
            self._ask_server = None
        super().destroy_node()


class _Counter:
    """A thread-safe count of callbacks in progress (``with counter: ...``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0
        self.last_exit = float("-inf")  # monotonic time the last callback returned

    def __enter__(self):
        with self._lock:
            self.value += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.value -= 1
            self.last_exit = time.monotonic()


def _kv(**values) -> list:
    return [KeyValue(key=k, value=str(v)) for k, v in values.items()]


def main(args=None) -> int:
    """``infmllm-node``: run the node until SIGINT/SIGTERM (see :mod:`.run` for the stop order)."""
    from .run import exit_now, run_node

    # Params files are read before rclpy.init, which would only say "failed to parse".
    problem = params_file_problem(sys.argv if args is None else args)
    if problem:
        print(f"[{DEFAULT_NODE_NAME}] cannot start: {problem}", file=sys.stderr)
        code = 2
    else:
        code = run_node(InfMllmNode, args, name=DEFAULT_NODE_NAME, startup_errors=(ParameterError,))
    if args is None:  # the executable (not a caller in this process): skip the slow teardown
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
