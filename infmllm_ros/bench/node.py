"""Node: the real ``infmllm`` node over DDS beside the engine alone, in one run.

For each frame rate in ``rates`` (Hz), two phases run back to back (their order
alternates from one rate to the next, so a drift in machine load hits both):

* **engine**: this process drives the engine directly, without ROS: the same
  frames arrive at ``rate`` Hz into a latest-frame slot, a plain loop samples
  the slot at ``rate`` Hz (OpenCV describer -> tokens -> ``Stream.append_chunk``)
  and asks a question every ``query_every_s`` s (``Stream.ask``,
  ``query_tokens`` tokens at most), one thing at a time;
* **node**: the node (a child process ``infmllm_node`` by default, or in this
  process with ``node_process: inproc``, as ``--quick`` does) with the same
  model, threads and stream settings, ``sample_rate_hz = rate``, scene
  descriptions off; this process publishes the same frames as
  ``sensor_msgs/Image`` (rgb8, sensor-data QoS) at ``rate`` Hz and calls
  ``~/query`` with the same questions on the same schedule.

Measured in each phase over ``duration_s`` seconds (after the first frame is in
the stream): answer latency (from the moment the question is due to the
answer, client side), answer tokens/s (generated tokens / that latency),
frames encoded per second (the node's ``~/get_stats`` counter), and the CPU
seconds the phase's process spent. Each rate's ratio line gives node/engine for
each figure (1.0 = the node costs nothing; the target is >= 0.8 for tokens/s
and frames/s).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .common import BenchConfig, Variant, data_file, emit, get_model, record

QUESTIONS = (
    "How many people did the camera see most recently?",
    "Where in the picture were the people?",
    "Was there motion recently, and where?",
    "What colour was the scene mostly?",
)
T0 = 1_700_000_000
TOPIC = "/bench/camera/image_raw"
NAMESPACE = "/bench"
NODE_NAME = "infmllm"


def clip_frames(cfg: BenchConfig, count: int = 60, fps: float = 2.0) -> list:
    """The first ``count`` full-size RGB frames of the clip sampled at ``fps`` (the phases cycle them)."""
    import itertools

    from .common import video_frames

    out = [frame for _, frame in itertools.islice(video_frames(data_file(cfg.video), fps), count)]
    if not out:
        raise ValueError(f"no frames in {cfg.video}")
    return out


def stream_config(cfg: BenchConfig, budget: int):
    """The stream settings both phases use (the node gets the same as parameters: :func:`node_parameters`)."""
    variant = Variant("infmllm", "infmllm", budget, float(cfg.biases[0]) if cfg.biases else 0.0)
    return variant.stream_config(cfg)


def node_parameters(cfg: BenchConfig, budget: int, rate: float, threads: int) -> dict:
    sc = stream_config(cfg, budget)
    return {
        "model.name": cfg.model, "model.device": cfg.device, "model.dtype": cfg.dtype,
        "model.quantize": cfg.quantize,  # as the engine phase's model (the node's own default is auto)
        "model.num_threads": int(threads), "encoder.type": "offline",
        "cache.policy": sc.policy, "cache.budget_tokens": int(sc.budget_tokens),
        "cache.max_chunk_tokens": int(sc.max_chunk_tokens), "cache.sinks": int(sc.sinks),
        "cache.recent": int(sc.recent), "cache.bias": float(sc.bias),
        "cache.retrieval_window": int(sc.retrieval_window), "cameras.names": ["front"],
        "cameras.front.topic": TOPIC, "sample_rate_hz": float(rate), "scene.period_s": 0.0,
        "query.timeout_s": float(max(120.0, 4 * cfg.query_every_s)), "diagnostics.period_s": 2.0,
        "query.max_new_tokens": int(cfg.query_tokens),
    }


def _summary(answers: list, encoded: int, window_s: float, cpu_s: float, rate: float) -> dict:
    lat = [a["latency_s"] for a in answers]
    tps = [a["generated"] / a["latency_s"] for a in answers if a["latency_s"] > 0 and a["generated"]]
    return {
        "questions": len(answers), "answer_latency_s": statistics.median(lat) if lat else None,
        "answer_latency_runs": lat, "answer_tok_s": statistics.median(tps) if tps else None,
        "answer_tok_s_runs": tps, "generated_tokens": [a["generated"] for a in answers],
        "frames_encoded": encoded, "frames_per_s": encoded / window_s if window_s > 0 else 0.0,
        "target_hz": rate, "window_s": window_s, "cpu_s": cpu_s,
        "cpu_share": cpu_s / window_s if window_s > 0 else 0.0,
    }


def _cpu_seconds(pid: Optional[int] = None) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# -- engine alone ---------------------------------------------------------------------------------------------


def engine_phase(cfg: BenchConfig, lm, budget: int, rate: float, frames: list) -> dict:
    from infmllm_ros.engine import Stream
    from infmllm_ros.perception.encoders import make_encoder
    from infmllm_ros.perception.tracking import TrackerConfig

    stream = Stream(lm, stream_config(cfg, budget))
    # As the node builds it with its default encoder.* parameters (its tracker runs at the sample rate).
    encoder = make_encoder("offline", lm, tracker=TrackerConfig(frame_rate=rate))
    period = 1.0 / rate
    answers, encoded, encode_s, append_s = [], 0, [], []
    last_index, last_sample = -1, -1e9
    # Warm-up: one frame in the stream before the clock starts (as the node phase waits for one).
    chunk = encoder.encode(frames[0], "front", float(T0))
    stream.append_chunk(chunk)
    start = time.monotonic()
    cpu0 = _cpu_seconds()
    next_q, qi = start + min(cfg.query_every_s / 2, cfg.duration_s / 2), 0
    end = start + cfg.duration_s
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_q:
                a = stream.ask(QUESTIONS[qi % len(QUESTIONS)], max_new_tokens=cfg.query_tokens)
                answers.append({"latency_s": time.monotonic() - next_q, "generated": a.generated_tokens,
                                "prompt": a.prompt_tokens})
                next_q += cfg.query_every_s
                qi += 1
                continue
            newest = int((now - start) / period)  # the camera's newest frame so far
            if newest > last_index and now >= last_sample + period:
                last_index, last_sample = newest, now
                t0 = time.perf_counter()
                chunk = encoder.encode(frames[(newest + 1) % len(frames)], "front", T0 + 1 + newest * period)
                t1 = time.perf_counter()
                stream.append_chunk(chunk)
                append_s.append(time.perf_counter() - t1)
                encode_s.append(t1 - t0)
                encoded += 1
                continue
            wake = min(next_q, start + (last_index + 1) * period, last_sample + period, end)
            time.sleep(max(0.0, min(0.05, wake - time.monotonic())))
        window = time.monotonic() - start
        out = _summary(answers, encoded, window, _cpu_seconds() - cpu0, rate)
    finally:
        stream.close()
    out.update(encode_s=statistics.mean(encode_s) if encode_s else None,
               append_s=statistics.mean(append_s) if append_s else None)
    return out


# -- the node ---------------------------------------------------------------------------------------------------


class _Probe:
    """This process's side of the node phase: a camera publisher, ~/query and ~/get_stats clients."""

    def __init__(self, context):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from infmllm_ros.srv import GetStats, Query

        self.node = Node("bench_probe", context=context)
        self.pub = self.node.create_publisher(Image, TOPIC, qos_profile_sensor_data)
        fqn = f"{NAMESPACE}/{NODE_NAME}"
        self.query = self.node.create_client(Query, f"{fqn}/query")
        self.get_stats = self.node.create_client(GetStats, f"{fqn}/get_stats")
        self.diagnostics: dict = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, QoSProfile(depth=10))
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - context shut down at the end of the phase
            pass

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(": stream"):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def call(self, client, request, timeout: float):
        fut = client.call_async(request)
        end = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < end:
            time.sleep(0.01)
        return fut.result() if fut.done() else None

    def stats(self):
        from infmllm_ros.srv import GetStats

        return self.call(self.get_stats, GetStats.Request(), 60.0)

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()


def _image(rgb, stamp: float):
    from sensor_msgs.msg import Image

    m = Image()
    m.header.stamp.sec = int(stamp)
    m.header.stamp.nanosec = int(round((stamp - int(stamp)) * 1e9))
    m.header.frame_id = "camera_optical"
    m.height, m.width = int(rgb.shape[0]), int(rgb.shape[1])
    m.encoding, m.step = "rgb8", int(rgb.shape[1]) * 3
    m.data = rgb.tobytes()
    return m


def _start_node(cfg: BenchConfig, lm, params: dict, context):
    """The node under test: a child process (default) or an in-process node on its own executor."""
    if cfg.node_process == "inproc":
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.parameter import Parameter

        from infmllm_ros.ros.node import InfMllmNode

        node = InfMllmNode(NODE_NAME, loaded_model=lm, context=context, namespace=NAMESPACE,
                           parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        executor = MultiThreadedExecutor(num_threads=node.executor_threads(), context=context)
        executor.add_node(node)
        thread = threading.Thread(target=executor.spin, daemon=True)
        thread.start()
        return ("inproc", node, executor, thread)
    args = [sys.executable, "-m", "infmllm_ros.ros.node", "--ros-args", "-r", f"__node:={NODE_NAME}",
            "-r", f"__ns:={NAMESPACE}"]
    for key, value in params.items():
        if isinstance(value, list):
            value = "[" + ",".join(str(v) for v in value) + "]"
        elif isinstance(value, bool):
            value = str(value).lower()
        args += ["-p", f"{key}:={value}"]
    log = open(Path(cfg.out) / "node_phase.log", "a")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    return ("process", proc, log)


def _stop_node(handle) -> None:
    if handle[0] == "inproc":
        _, node, executor, thread = handle
        node.shutdown()
        executor.shutdown(timeout_sec=10.0)
        node.destroy_node()
        thread.join(10.0)
        return
    _, proc, log = handle
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


def node_phase(cfg: BenchConfig, lm, budget: int, rate: float, frames: list, threads: int) -> dict:
    import rclpy
    from rclpy.context import Context

    from infmllm_ros.srv import Query

    context = Context()
    rclpy.init(context=context)
    probe = _Probe(context)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    handle = _start_node(cfg, lm, node_parameters(cfg, budget, rate, threads), context)
    stop = threading.Event()
    sent = [0]

    def camera():
        period = 1.0 / rate
        next_t = time.monotonic()
        while not stop.is_set():
            probe.pub.publish(_image(frames[sent[0] % len(frames)], T0 + sent[0] * period))
            sent[0] += 1
            next_t += period
            stop.wait(max(0.0, next_t - time.monotonic()))

    cam = threading.Thread(target=camera, daemon=True)
    try:
        load_start = time.monotonic()
        if not probe.query.wait_for_service(timeout_sec=cfg.node_load_timeout_s):
            raise RuntimeError(f"the node did not come up within {cfg.node_load_timeout_s:g} s "
                               f"(see {Path(cfg.out) / 'node_phase.log'})")
        load_s = time.monotonic() - load_start
        cam.start()
        first = time.monotonic()
        while True:  # one frame in the stream before the clock starts
            st = probe.stats()
            if st is not None and st.frames_encoded >= 1:
                break
            if time.monotonic() - first > 300:
                raise RuntimeError("the node encoded no frame in 300 s")
            time.sleep(0.2)
        pid = handle[1].pid if handle[0] == "process" else None
        start = time.monotonic()
        cpu0 = _cpu_seconds(pid)
        encoded0 = st.frames_encoded
        answers = []
        next_q, qi = start + min(cfg.query_every_s / 2, cfg.duration_s / 2), 0
        end = start + cfg.duration_s
        while time.monotonic() < end:
            if time.monotonic() < next_q:
                time.sleep(min(0.05, max(0.0, next_q - time.monotonic())))
                continue
            req = Query.Request(question=QUESTIONS[qi % len(QUESTIONS)], max_new_tokens=cfg.query_tokens)
            res = probe.call(probe.query, req, timeout=max(120.0, 4 * cfg.query_every_s) + 30)
            if res is None or not res.success:
                raise RuntimeError(f"question {qi} failed: {res.message if res else 'no response'}")
            answers.append({"latency_s": time.monotonic() - next_q, "generated": res.generated_tokens,
                            "prompt": res.prompt_tokens, "node_latency_s": res.latency_s})
            next_q += cfg.query_every_s
            qi += 1
        st = probe.stats()
        window = time.monotonic() - start
        out = _summary(answers, st.frames_encoded - encoded0, window, _cpu_seconds(pid) - cpu0, rate)
        diag = dict(probe.diagnostics)
        out.update(node_load_s=load_s, node_process=cfg.node_process, frames_published=sent[0],
                   frames_received=st.frames_received, frames_dropped=st.frames_dropped,
                   encode_s=_float(diag.get("encode_s")), append_s=_float(diag.get("append_s")))
        return out
    finally:
        stop.set()
        if cam.is_alive():
            cam.join(5.0)
        _stop_node(handle)
        probe.close()
        rclpy.try_shutdown(context=context)


def _float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- the run ----------------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    import torch

    lm = get_model(cfg, lm)
    threads = cfg.threads or torch.get_num_threads()
    frames = clip_frames(cfg)
    results = []
    for budget in cfg.budgets:
        for i, rate in enumerate(cfg.rates):
            rate = float(rate)
            order = ("engine", "node") if i % 2 == 0 else ("node", "engine")
            phases = {}
            for phase in order:
                print(f"[node bench] {phase} at {rate:g} Hz, {cfg.duration_s:g} s ...", file=sys.stderr, flush=True)
                if phase == "engine":
                    phases[phase] = engine_phase(cfg, lm, int(budget), rate, frames)
                else:
                    phases[phase] = node_phase(cfg, lm, int(budget), rate, frames, threads)
            for phase in ("engine", "node"):
                line = record(cfg, lm, Variant(phase, "infmllm", int(budget)), phase=phase, rate_hz=rate,
                              threads=threads, query_every_s=cfg.query_every_s, query_tokens=cfg.query_tokens,
                              duration_s=cfg.duration_s, **phases[phase])
                results.append(line)
                emit(cfg, line)
            e, n = phases["engine"], phases["node"]
            ratio = record(cfg, lm, Variant("node/engine", "infmllm", int(budget)), phase="ratio", rate_hz=rate,
                           threads=threads,
                           answer_tok_s=_ratio(n["answer_tok_s"], e["answer_tok_s"]),
                           answer_latency_s=_ratio(n["answer_latency_s"], e["answer_latency_s"]),
                           frames_per_s=_ratio(n["frames_per_s"], e["frames_per_s"]),
                           cpu_s=_ratio(n["cpu_s"], e["cpu_s"]))
            results.append(ratio)
            emit(cfg, ratio)
    return results


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b
