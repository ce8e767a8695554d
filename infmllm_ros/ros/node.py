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
  ``~/scene`` (infmllm_ros/msg/SceneDescription) and ``/diagnostics``.

Parameters are all in :mod:`infmllm_ros.ros.params`. Shutdown order: stop the
worker (the running answer stops between tokens), shut the executor down,
destroy the node, ``rclpy.try_shutdown()``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Tuple

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from infmllm_ros.action import Ask
from infmllm_ros.msg import SceneDescription
from infmllm_ros.srv import GetStats, Query

from .core import FrameRef, Job, JobQueue, FrameSlots, sec_to_stamp
from .params import DEFAULT_NODE_NAME, NodeSettings, ParameterError, declare_node_parameters
from .worker import AnswerResult, StreamWorker

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


def build_encoder(lm, settings: NodeSettings):
    """The frame encoder named by ``encoder.type`` (perception/encoders.py)."""
    from infmllm_ros.perception.encoders import make_encoder

    e = settings.encoder
    return make_encoder(e.type, lm, image_size=e.image_size, max_pixels=e.max_pixels,
                        min_pixels=e.min_pixels)


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
        self.worker: Optional[StreamWorker] = None
        try:
            self.settings, self._params = declare_node_parameters(self, self._on_settings)
            self._start(loaded_model)
        except BaseException:
            self.shutdown()
            super().destroy_node()
            raise

    # -- start-up -------------------------------------------------------------------

    def _start(self, loaded_model) -> None:
        from infmllm_ros.engine import Stream

        s = self.settings
        log = self.get_logger()
        t0 = time.monotonic()
        if s.model.num_threads:
            import torch

            torch.set_num_threads(s.model.num_threads)
        if loaded_model is None:
            log.info(f"loading model '{s.model.name}' (device {s.model.device}, dtype "
                     f"{s.model.dtype}) ...")
            loaded_model = load_for_settings(s)
            how = f"loaded in {time.monotonic() - t0:.1f} s"
        else:
            how = "already loaded"
        self.lm = loaded_model
        try:
            self.stream = Stream(self.lm, s.stream_config())
            self.encoder = build_encoder(self.lm, s)
        except ValueError as exc:  # a budget the model cannot use, an unknown encoder ...
            raise ParameterError(str(exc)) from None
        log.info(
            f"model '{self.lm.name}' ({self.lm.kind}) on {self.lm.device}, {self.lm.dtype}"
            f"{', int8 weights' if self.lm.quantize == 'int8' else ''} ({how}); "
            f"encoder {s.encoder.type}; cache policy {s.cache.policy}, budget "
            f"{self.stream.budget} tokens, at most {self.stream.capacity or 'unbounded'} held"
            + (f" / {s.cache.budget_bytes} bytes" if s.cache.budget_bytes else ""))
        compiled_s = self.stream.warmup()
        log.info(f"decode step: compiled in {compiled_s:.1f} s (model.compile {s.model.compile})"
                 if compiled_s is not None else
                 f"decode step: eager (model.compile {s.model.compile} on {self.lm.device.type}"
                 + (f"; compiling failed: {self.stream.compile_error})" if self.stream.compile_error
                    else ")"))

        self.max_answer_tokens = max(1, self.stream.max_answer_tokens)

        self.slots = FrameSlots(s.camera_names, on_put=self._wake_worker)
        self.jobs = JobQueue(s.query.queue_size, s.query.busy_policy, on_submit=self._wake_worker)
        self.worker = StreamWorker(self.stream, self.slots, self.jobs, self._make_chunk, s,
                                   on_scene=self._publish_scene, logger=log)
        self.worker.max_answer_tokens = self.max_answer_tokens

        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self._query_group = ReentrantCallbackGroup()
        self._admin_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

        self.scene_pub = self.create_publisher(SceneDescription, "~/scene", QoSProfile(depth=10))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self._subs = []
        for cam in s.cameras:
            msg_type = CompressedImage if cam.transport == "compressed" else Image
            self._subs.append(self.create_subscription(
                msg_type, cam.topic, lambda msg, name=cam.name: self.slots.put(name, msg),
                qos_profile_sensor_data, callback_group=self._sensor_group))
            log.info(f"camera '{cam.name}': {cam.topic} ({msg_type.__name__})")

        self.create_service(Query, "~/query", self._on_query, callback_group=self._query_group)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self._admin_group)
        self.create_service(GetStats, "~/get_stats", self._on_get_stats,
                            callback_group=self._admin_group)
        self._ask_server = ActionServer(
            self, Ask, "~/ask", execute_callback=self._execute_ask,
            goal_callback=self._on_ask_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            callback_group=self._query_group)
        self._diag_timer = None
        self._make_diag_timer(s.diagnostics_period_s)
        self.worker.start()
        log.info(f"ready: {len(s.cameras)} camera(s) at {s.sample_rate_hz:g} Hz; scene every "
                 + (f"{s.scene.period_s:g} s" if s.scene.period_s > 0 else "(off)")
                 + f"; queries {s.query.busy_policy} (queue {s.query.queue_size})")

    def executor_threads(self) -> int:
        """Threads a MultiThreadedExecutor needs so waiting questions never starve the rest."""
        return max(4, min(64, self.settings.query.queue_size + 5))

    # -- parameters --------------------------------------------------------------

    def _on_settings(self, s: NodeSettings) -> None:
        old = self.settings
        self.settings = s
        if self.worker is not None:
            self.worker.settings = s
            self.jobs.configure(s.query.queue_size, s.query.busy_policy)
            if s.diagnostics_period_s != old.diagnostics_period_s:
                self._make_diag_timer(s.diagnostics_period_s)
            self._wake_worker()

    def _make_diag_timer(self, period: float) -> None:
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        if period > 0:
            self._diag_timer = self.create_timer(period, self._publish_diagnostics,
                                                 callback_group=self._timer_group)

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
        return self.encoder.encode(rgb, camera, ref.seconds), ref

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
        m.cache_budget_tokens = int(st.capacity_tokens)
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
                  max_new_tokens=min(n, self.max_answer_tokens))
        job.on_text = on_text
        reason = self.jobs.submit(job)
        return (None, reason) if reason else (job, None)

    def _fill_answer(self, resp, job: Job, t0: float):
        resp.latency_s = float(time.monotonic() - t0)
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
        resp.message = "cancelled (partial answer)" if a.cancelled else ""
        return resp

    def _on_query(self, req: Query.Request, resp: Query.Response) -> Query.Response:
        t0 = time.monotonic()
        job, reason = self._submit_question(req.question, req.camera, req.max_new_tokens)
        if job is None:
            resp.success, resp.message = False, reason
            self.get_logger().info(f"query refused: {reason}")
            return resp
        timeout = self.settings.query.timeout_s
        if not job.wait(timeout):
            job.cancel()
            resp.success = False
            resp.message = f"timed out after {timeout:g} s (query.timeout_s); the answer was cancelled"
            resp.latency_s = float(time.monotonic() - t0)
            return resp
        return self._fill_answer(resp, job, t0)

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
        deadline = t0 + self.settings.query.timeout_s
        while not job.wait(0.05):
            if goal_handle.is_cancel_requested or time.monotonic() > deadline:
                job.cancel()
                job.wait(5.0)
                break
        if job.done:
            self._fill_answer(result, job, t0)
        else:
            result.success, result.message = False, "timed out"
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

    def _on_reset(self, req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        before = self.worker.stats.tokens_held
        job = Job("reset", control=True)
        reason = self.jobs.submit(job)
        if reason is None and not job.wait(self.settings.query.timeout_s):
            job.cancel()
            reason = "timed out waiting for the worker"
        if reason is None and job.error:
            reason = job.error
        resp.success = reason is None
        resp.message = reason or f"cache cleared ({before} tokens dropped)"
        self.get_logger().info(f"reset: {resp.message}")
        return resp

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
        # The ceiling the cache honours at every moment (budget + room for a chunk and an
        # answer), so cache_tokens never shows above it.
        resp.cache_budget_tokens = int(st.capacity_tokens)
        resp.cache_bytes = int(st.bytes_held)
        resp.cache_budget_bytes = self.cache_budget_bytes()
        resp.tokens_seen = int(st.tokens_seen)
        resp.tokens_evicted = int(st.evictions)
        resp.frames_received = t.received
        resp.frames_encoded = t.encoded
        resp.frames_dropped = t.dropped
        resp.oldest_frame_stamp = to_time(self.worker.book.lookup(st.oldest_stamp))
        resp.newest_frame_stamp = to_time(self.worker.book.lookup(st.newest_stamp))
        resp.next_position = int(st.next_position)
        return resp

    # -- diagnostics ---------------------------------------------------------------

    def diagnostics(self) -> DiagnosticArray:
        """The node's DiagnosticArray: one status per camera and one for the stream."""
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        hw = self.get_fully_qualified_name()
        period = 1.0 / self.settings.sample_rate_hz
        for name, c in self.slots.counts().items():
            cam = self.settings.camera(name)
            s = DiagnosticStatus(name=f"{self.get_name()}: camera {name}", hardware_id=hw)
            if c.received == 0:
                s.level, s.message = DiagnosticStatus.WARN, "no images received yet"
            elif c.bad and c.bad >= c.encoded:
                s.level, s.message = DiagnosticStatus.WARN, f"unusable images: {c.last_error}"
            else:
                s.level, s.message = DiagnosticStatus.OK, "receiving"
            s.values = _kv(topic=cam.topic if cam else "", received=c.received,
                           dropped=c.dropped, encoded=c.encoded, bad=c.bad,
                           received_hz=f"{c.received_hz:.2f}", encoded_hz=f"{c.encoded_hz:.2f}",
                           target_hz=f"{1.0 / period:.2f}", last_error=c.last_error)
            arr.status.append(s)
        st = self.worker.stats
        lat = self.worker.latency
        s = DiagnosticStatus(name=f"{self.get_name()}: stream", hardware_id=hw)
        if not self.worker.alive and not self._closed:
            s.level, s.message = DiagnosticStatus.ERROR, f"worker stopped: {self.worker.error}"
        elif self.worker.error:
            s.level, s.message = DiagnosticStatus.WARN, f"last error: {self.worker.error}"
        else:
            s.level, s.message = DiagnosticStatus.OK, f"{st.tokens_held} tokens held"
        s.values = _kv(model=self.lm.name, device=str(self.lm.device), dtype=str(self.lm.dtype),
                       policy=st.policy, cache_tokens=st.tokens_held,
                       cache_budget_tokens=st.capacity_tokens, cache_bytes=st.bytes_held,
                       cache_bytes_reserved=st.bytes_reserved,
                       cache_budget_bytes=self.cache_budget_bytes(), tokens_seen=st.tokens_seen,
                       tokens_evicted=st.evictions, frames_in_stream=st.frames_seen,
                       queries_answered=lat.count, queries_refused=self.jobs.refused,
                       queries_waiting=self.jobs.pending(),
                       query_latency_last_s=f"{lat.last_s:.3f}",
                       query_latency_mean_s=f"{lat.mean_recent_s:.3f}",
                       scenes_published=self.worker.scenes_published,
                       **{k: f"{v:.3f}" for k, v in self.worker.timing.items()})
        arr.status.append(s)
        return arr

    def _publish_diagnostics(self) -> None:
        self._safe_publish(self.diag_pub, self.diagnostics())

    # -- shutdown ----------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the worker (answers stop between tokens) and join it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.worker is not None:
            if self.jobs.busy:
                self.get_logger().info("stopping: cancelling the answer in progress")
            if self.worker.stop(timeout):
                self.stream.close()  # give the (maybe shared) model its own attention back
            else:
                self.get_logger().warning("worker did not stop in time")

    def destroy_node(self) -> None:
        self.shutdown()
        if getattr(self, "_ask_server", None) is not None:
            self._ask_server.destroy()
            self._ask_server = None
        super().destroy_node()


def _kv(**values) -> list:
    return [KeyValue(key=k, value=str(v)) for k, v in values.items()]


def main(args=None) -> int:
    """``infmllm_node``: run the node on a MultiThreadedExecutor until Ctrl-C."""
    rclpy.init(args=args)
    node: Optional[InfMllmNode] = None
    executor: Optional[MultiThreadedExecutor] = None
    code = 0
    try:
        node = InfMllmNode()
        executor = MultiThreadedExecutor(num_threads=node.executor_threads())
        executor.add_node(node)
        executor.spin()
    except ParameterError as exc:
        print(f"[{DEFAULT_NODE_NAME}] cannot start: {exc}", file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.shutdown()
        if executor is not None:
            executor.shutdown(timeout_sec=10.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
