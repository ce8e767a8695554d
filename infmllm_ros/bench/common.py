"""What every benchmark shares: the config dataclass, YAML defaults, policy variants, results, plots.

As in kvpress' ``evaluation/``: one :class:`BenchConfig` dataclass, defaults in
``config/bench.yaml`` (a ``common`` section, one section per subcommand and a
``quick`` section per subcommand), CLI options override both, and the config
that actually ran is saved beside the results.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

REPO = Path(__file__).resolve().parents[2]

COMMANDS = ("ppl", "recall", "speed", "memory", "sceneqa", "gpu", "node", "quant")
#: list settings whose items are not of their default's first item's type (edges may be fractional seconds)
_LIST_ITEMS = {"lag_buckets": "number", "event_interval_s": "number", "rates": "number", "biases": "number"}
#: stream settings a benchmark sets from its own options, which a policy's brackets may not override
_SET_BY_THE_BENCH = {"policy", "budget_tokens", "budget_bytes", "budget_bytes_per_layer", "max_chunk_tokens", "compile"}


@dataclass
class BenchConfig:
    """Every knob of every benchmark (each subcommand reads the ones it needs)."""

    command: str = "ppl"
    # model
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "sdpa"
    threads: int = 0  # torch threads; 0 = torch's default
    quantize: str = "none"  # none | auto | int8 | int4 (Linear weights; engine.models.quantize_model)
    compile: str = "auto"  # decode steps compiled with static shapes: auto (CUDA only) | on | off
    # cache
    policies: list = field(default_factory=lambda: ["full", "window", "streamingllm", "h2o", "infmllm"])
    budgets: list = field(default_factory=lambda: [1024])
    biases: list = field(default_factory=lambda: [0.0])  # one infmllm variant per value
    chunk: int = 256
    sinks: int = 4
    recent: int = 64
    retrieval_window: int = 64
    h2o_recent_ratio: float = 0.5
    # inputs
    text: str = "text/pg158-emma.txt"  # relative paths are under the shared data folder
    video: str = "video/vtest.avi"
    tokens: int = 32768
    # ppl
    segment: int = 2048
    full_cap: int = 0  # 0 = the model's context (max_position_embeddings)
    # recall
    trials: int = 8
    distances: list = field(default_factory=lambda: [500, 1500])  # single fact: tokens between fact and question
    rounds: int = 12
    round_tokens: int = 300
    lags: list = field(default_factory=lambda: [2, 4, 8])  # multi: round r asks about round r - lags[r % len(lags)]
    candidates: int = 10
    free_form_tokens: int = 6
    scenarios: list = field(default_factory=lambda: ["single", "multi"])
    distractors: str = "unplanted"  # multi: unplanted (words never in the stream) or planted (the other facts' words)
    # speed
    reference: bool = True  # speed: plain transformers (DynamicCache) in the same rounds, as the yardstick
    repeats: int = 3
    decode_tokens: int = 32
    query_tokens: int = 16
    peer: str = ""  # speed: "llama.cpp" adds llama.cpp and plain transformers as references (bench/peers.py)
    # node (bench/node.py): the real node over DDS beside the engine alone
    rates: list = field(default_factory=lambda: [1.0, 5.0])  # camera Hz = the node's sample_rate_hz
    duration_s: float = 180.0  # measured seconds per phase
    node_process: str = "process"  # process: infmllm_node as a child process; inproc: in this process
    node_load_timeout_s: float = 900.0  # the node's start-up (model load) may take this long
    # memory
    minutes: float = 60.0
    fps: float = 1.0
    query_every_s: float = 300.0
    time_limit_s: float = 0.0  # per variant; 0 = none. A variant that runs out stops early and says so.
    clip_frames: int = 0  # describe only the first N sampled frames of the clip (0 = all)
    describe_live: bool = False  # True: run the describer on every frame instead of replaying its lines
    describe_frames: int = 40  # sampled frames timed for the describer comparison (YOLO vs HOG/Haar); 0 = skip
    # sceneqa
    cameras: list = field(default_factory=lambda: ["front=video/vtest.avi",
                                                   "hall=video/one-by-one-person-detection.mp4"])
    event_cameras: list = field(default_factory=list)  # name=video: frames only now and then
    event_interval_s: list = field(default_factory=lambda: [5.0, 300.0])  # event cameras: seconds between frames
    question_cameras: str = "event"  # event: ask about the event cameras' lines; all: about every camera's
    questions: int = 300  # per policy variant and budget, spread evenly over the lag buckets
    commit_questions: bool = False  # False: probe questions on a snapshot, so they never change the stream
    scene_period_s: float = 20.0  # the node's SceneDescription (kept in the stream) every this many s; 0: none
    scene_prompt: str = "In one sentence: how many people did the camera see most recently, and where?"
    scene_tokens: int = 16  # longest scene description
    lag_buckets: list = field(default_factory=lambda: [1, 10, 30, 60, 120, 300, 600])  # bucket edges, seconds
    question_types: list = field(default_factory=lambda: ["people"])
    answer_cue: str = "line"  # line: the answer opens with the asked line's "HH:MM:SS camera:"; none: no cue
    # gpu (VLM path)
    vlm_families: list = field(default_factory=lambda: ["qwen2_5_vl", "idefics3"])
    vlm_frames: int = 120
    vlm_size: str = "real"  # random_vlm size: real (published sizes) or tiny (tests)
    vlm_budget: int = 4096
    vlm_max_pixels: int = 448 * 448  # Qwen2.5-VL: 256 visual tokens per frame
    parts: dict = field(default_factory=dict)  # gpu: per-part overrides {ppl: {...}, speed: {...}, memory: {...}}
    # output
    out: str = "bench_results"
    json: bool = False
    plot: bool = False
    quick: bool = False
    seed: int = 0

    def _check_model_settings(self) -> None:
        """device, dtype and quantize together, as load_model would check them (the gpu benchmark,
        which asks for CUDA, says itself when there is none)."""
        import torch

        from infmllm_ros.engine.models import check_quantize, resolve_device, resolve_dtype

        if self.command == "quant" and (self.quantize != "none" or self.dtype not in ("float32", "auto")):
            raise ValueError("the quant benchmark quantizes a float32 model itself: run it with quantize none "
                             f"and dtype float32 (got quantize {self.quantize!r}, dtype {self.dtype!r})")
        if self.command == "gpu" and self.device.startswith("cuda") and not torch.cuda.is_available():
            return
        device = resolve_device(self.device)  # refuses CUDA where there is none
        check_quantize(self.quantize, device, resolve_dtype(self.dtype, device))

    def _check_types(self) -> None:
        """Every setting has its default's type (a list's items too, numbers finite), so that a YAML value of the
        wrong shape (``budgets=5``, ``chunk=2.5``, ``minutes=.inf``, ``policies=infmllm``) is refused by name before
        anything runs, not met as a TypeError or an endless run later."""
        def kind(value) -> str:
            if isinstance(value, bool):
                return "bool"
            if isinstance(value, numbers.Integral):
                return "int"
            if isinstance(value, numbers.Real):
                return "number"
            return type(value).__name__

        def fits(value, want: str) -> bool:
            got = kind(value)
            if want == "number":
                return got in ("int", "number") and math.isfinite(value)
            return got == want

        for f in fields(self):
            default = f.default if f.default is not MISSING else f.default_factory()
            want, value = kind(default), getattr(self, f.name)
            if not fits(value, want):
                shape = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
                         "list": "a list", "dict": "a mapping"}.get(want, want)
                raise ValueError(f"{f.name} must be {shape}, got {value!r}")
            if want == "list":
                item = _LIST_ITEMS.get(f.name) or (kind(default[0]) if default else "str")
                if not all(fits(v, item) for v in value):
                    shape = {"int": "integers", "number": "finite numbers", "str": "strings"}[item]
                    raise ValueError(f"{f.name} must be a list of {shape}, got {value!r}")

    def validate(self) -> "BenchConfig":
        if self.command not in COMMANDS:
            raise ValueError(f"unknown benchmark {self.command!r}; choose one of {COMMANDS}")
        self._check_types()
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not self.policies:
            raise ValueError("policies is empty: name at least one (--policy)")
        if self.time_limit_s < 0:
            raise ValueError(f"time_limit_s must be >= 0 (0: none), got {self.time_limit_s}")
        from infmllm_ros.engine import POLICIES, StreamConfig
        from infmllm_ros.engine.decode import COMPILE_CHOICES
        from infmllm_ros.engine.policies import make_policy
        from infmllm_ros.engine.models import QUANTIZE_CHOICES

        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        self._check_model_settings()
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {self.compile!r}")
        for name in self.policies:
            base, _, knobs = parse_policy(name)
            unknown = sorted(set(knobs) - {f.name for f in fields(StreamConfig)})
            if unknown:
                raise ValueError(f"policy {name!r}: unknown stream settings {unknown}")
            ruled = sorted(set(knobs) & _SET_BY_THE_BENCH)
            if ruled:
                raise ValueError(f"policy {name!r}: {ruled} are set by the benchmark (the policy's name, --budget, "
                                 "--chunk, --set compile=...), not in its brackets")
            if "bias" in knobs and (isinstance(knobs["bias"], bool) or not isinstance(knobs["bias"], numbers.Real)):
                raise ValueError(f"policy {name!r}: bias must be a number, got {knobs['bias']!r}")
            if base not in POLICIES:
                raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)} (add -grow for rerotate=False)")
            # Each variant's whole stream config, now: a bad knob value (carry=max without decay, an
            # even pool ...) is refused before the model loads, not after it.
            for budget in self.budgets:
                for variant in variants(self, int(budget), [name]):
                    try:
                        config = variant.stream_config(self)
                        # the budget against the policy's sinks and recent tail, as Stream checks it (the chunk is
                        # left out: some benchmarks stream their own chunk size, and Stream checks that one)
                        if config.policy != "full":
                            make_policy(config.policy, **asdict(config)).check_budget(config.budget_tokens, 0)
                    except (TypeError, ValueError) as exc:
                        raise ValueError(f"policy {name!r} at budget {budget}: {exc}") from None
        for name in ("chunk", "tokens", "segment", "trials", "candidates", "repeats", "free_form_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(int(d) < 1 for d in self.distances) or any(int(g) < 1 for g in self.lags):
            raise ValueError(f"distances and lags must be >= 1, got {self.distances}, {self.lags}")
        if self.peer not in ("", "llama.cpp"):
            raise ValueError(f"unknown peer {self.peer!r}; the one peer is 'llama.cpp'")
        if self.node_process not in ("process", "inproc"):
            raise ValueError(f"node_process must be 'process' or 'inproc', got {self.node_process!r}")
        if any(not float(r) > 0 for r in self.rates) or not float(self.duration_s) > 0:
            raise ValueError(f"rates and duration_s must be > 0, got {self.rates}, {self.duration_s}")
        if any(int(b) < 1 for b in self.budgets):
            raise ValueError(f"budgets must be >= 1, got {self.budgets}")
        if any(not (float(b) >= 0 and math.isfinite(float(b))) for b in self.biases):
            raise ValueError(f"biases must be finite and >= 0, got {self.biases}")
        edges = [float(e) for e in self.lag_buckets]
        if len(edges) < 2 or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"lag_buckets must be >= 2 increasing edges from >= 1 s, got {self.lag_buckets}")
        if not self.scenarios or set(self.scenarios) - {"single", "multi"}:
            raise ValueError(f"scenarios must name 'single' and/or 'multi', got {self.scenarios}")
        if self.distractors not in ("unplanted", "planted"):
            raise ValueError(f"distractors must be 'unplanted' or 'planted', got {self.distractors!r}")
        if self.question_cameras not in ("event", "all"):
            raise ValueError(f"question_cameras must be 'event' or 'all', got {self.question_cameras!r}")
        if len(self.event_interval_s) != 2 or not 0 < float(self.event_interval_s[0]) <= float(
                self.event_interval_s[1]):
            raise ValueError(f"event_interval_s must be [low, high] seconds with 0 < low <= high, "
                             f"got {self.event_interval_s}")
        if self.answer_cue not in ("line", "none"):
            raise ValueError(f"answer_cue must be 'line' or 'none', got {self.answer_cue!r}")
        for name in ("questions", "minutes", "fps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (self.cameras or self.event_cameras):
            raise ValueError("sceneqa needs cameras or event_cameras")
        return self


def default_config_path() -> Path:
    """``$INFMLLM_BENCH_CONFIG``, else the source tree's ``config/bench.yaml``, else an install space's copy."""
    if os.environ.get("INFMLLM_BENCH_CONFIG"):
        return Path(os.environ["INFMLLM_BENCH_CONFIG"])
    candidates = [REPO / "config" / "bench.yaml", Path(sys.prefix) / "share" / "infmllm_ros" / "config" / "bench.yaml"]
    candidates += [Path(p) / "share" / "infmllm_ros" / "config" / "bench.yaml"
                   for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


def load_config(command: str, overrides: dict, quick: bool, path: Optional[Path] = None) -> BenchConfig:
    """Dataclass defaults < YAML ``common`` < YAML ``<command>`` < YAML ``quick.<command>`` (if quick) < CLI."""
    values: dict[str, Any] = {}
    named = path is not None
    path = Path(path) if named else default_config_path()
    if not path.is_file():
        if named:  # a file the user named must be there; only the default may be missing
            raise FileNotFoundError(f"no config file {path}")
        print(f"infmllm-bench: no {path}; using the built-in defaults (--quick sizes come from that file)",
              file=sys.stderr)
    else:
        import yaml

        def mapping(part, where: str) -> dict:
            if part is None:
                return {}
            if not isinstance(part, dict):
                raise ValueError(f"{path}: {where} must be a mapping of settings, got {type(part).__name__}")
            return part

        try:
            data = mapping(yaml.safe_load(path.read_text()) or {}, "the config")
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        values.update(mapping(data.get("common"), "common"))
        values.update(mapping(data.get(command), command))
        if quick:
            quick_part = mapping(data.get("quick"), "quick")
            values.update(mapping(quick_part.get("common"), "quick.common"))
            values.update(mapping(quick_part.get(command), f"quick.{command}"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["command"], values["quick"] = command, quick
    known = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown bench settings {unknown} (from {path} or the command line)")
    return BenchConfig(**values).validate()


# -- data ---------------------------------------------------------------------------------------------------


def shared_data_dir() -> Path:
    return Path(os.environ.get("INFMLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def data_file(name: str) -> Path:
    """``name`` as given if it exists, else under the shared data folder."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    candidate = shared_data_dir() / name
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"{name} not found (nor under {shared_data_dir()}; set INFMLLM_SHARED_DATA)")


def video_frames(path: Path, fps: float):
    """RGB frames of a clip sampled at ``fps`` (clip time), with their clip time in seconds."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")
    clip_fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    step = max(1, round(clip_fps / fps))
    index = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if index % step == 0:
                yield index / clip_fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()


def clip_observations(video: str, fps: float, camera: str, cache_dir: str | Path,
                      clip_frames: int = 0) -> tuple[list, float]:
    """The describer's :class:`Observation` for each sampled frame of a clip, and its seconds per frame.

    Described once and cached as JSON under ``cache_dir``, keyed by the clip,
    the rate and the describer's :meth:`~.FrameDescriber.fingerprint` (any
    camera may replay a cached clip: its name is set on load); observations
    are stamped ``1.7e9 + clip time`` and replayed by the benchmarks with
    their own stamps.
    """
    from dataclasses import replace

    from infmllm_ros.perception.describer import FrameDescriber, Observation

    path = data_file(video)
    describer = FrameDescriber()
    fingerprint = describer.fingerprint()
    cache = Path(cache_dir) / f"describe_{path.stem}_{fps:g}fps_{clip_frames or 'all'}_{fingerprint}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return [replace(Observation.from_dict(o), camera=camera) for o in data["observations"]], data["describe_s"]
    observations, spent = [], 0.0
    for clip_t, frame in video_frames(path, fps):
        if clip_frames and len(observations) >= clip_frames:
            break
        started = time.perf_counter()
        observations.append(describer.describe(frame, camera, 1_700_000_000.0 + clip_t))
        spent += time.perf_counter() - started
    if not observations:
        raise ValueError(f"no frames could be read from {path}")
    per_frame = spent / len(observations)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"video": str(path), "fps": fps, "describe_s": per_frame,
                                 "fingerprint": fingerprint,
                                 "observations": [o.to_dict() for o in observations]}, default=list))
    return observations, per_frame


def wilson(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``); (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def text_token_ids(lm, path: str, tokens: int, offset_chars: int = 0):
    """At least ``tokens`` token ids of a text file (``[1, n]``), repeating the file if it is shorter."""
    import torch

    text = data_file(path).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    text = text[offset_chars:] + "\n" + text[:offset_chars]
    take = max(4096, tokens * 6)
    pieces = []
    got = 0
    while got < tokens:
        ids = lm.tokenizer(text[:take], add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= tokens or take >= len(text):
            pieces.append(ids)
            got += ids.shape[1]
            if got < tokens:
                take = len(text)  # a short file repeats
        else:
            take *= 2
    return torch.cat(pieces, dim=1)[:, :tokens]


# -- machine, model ----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def machine_info() -> str:
    """CPU model and core count (and the GPU's name): the same for every line of a run, so read once."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    except Exception:  # pragma: no cover - torch always imports here
        pass
    return text


_MODELS: dict[tuple, Any] = {}


def get_model(cfg: BenchConfig, lm=None):
    """The loaded model: ``lm`` if given (tests share one load), else loaded once per process."""
    if lm is not None:
        return lm
    key = (cfg.model, cfg.device, cfg.dtype, cfg.attn, cfg.quantize)
    if key not in _MODELS:
        from infmllm_ros.engine import load_model

        _MODELS[key] = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, attn_implementation=cfg.attn,
                                  quantize=cfg.quantize)
    return _MODELS[key]


def dtype_name(lm) -> str:
    return str(lm.dtype).replace("torch.", "")


# -- policy variants ---------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One compared setting: a policy at a budget, with its knobs, under a readable label."""

    label: str
    policy: str
    budget: int
    bias: float = 0.0
    rerotate: bool = True
    knobs: dict = field(default_factory=dict)  # other StreamConfig fields, e.g. {"pool": 5}

    def stream_config(self, cfg: BenchConfig, chunk: Optional[int] = None):
        from infmllm_ros.engine import StreamConfig

        # `full` is the reference: no token budget (it would cap it), only the model's context.
        values = dict(policy=self.policy, budget_tokens=0 if self.policy == "full" else self.budget,
                      max_chunk_tokens=chunk or cfg.chunk, sinks=cfg.sinks, recent=cfg.recent,
                      retrieval_window=cfg.retrieval_window, bias=self.bias, h2o_recent_ratio=cfg.h2o_recent_ratio,
                      rerotate=self.rerotate, compile=cfg.compile)
        return StreamConfig(**{**values, **self.knobs}).validate()  # a variant's own knobs win


def parse_policy(name: str) -> tuple[str, bool, dict]:
    """``"infmllm[pool=5,decay=0.5]-grow"`` -> ``("infmllm", True, {"pool": 5, "decay": 0.5})``.

    The bracket sets any other ``StreamConfig`` field for this variant (YAML value syntax).
    """
    import yaml

    grow = name.endswith("-grow")
    base = name[: -len("-grow")] if grow else name
    knobs = {}
    if "[" in base:
        base, _, inner = base.partition("[")
        if not inner.endswith("]"):
            raise ValueError(f"policy {name!r}: knobs go in one trailing [key=value,...]")
        for item in filter(None, inner[:-1].split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"policy {name!r}: {item!r} is not key=value")
            if key.strip() in knobs:
                raise ValueError(f"policy {name!r}: {key.strip()!r} is given twice")
            knobs[key.strip()] = yaml.safe_load(value)
    return base, grow, knobs


def variants(cfg: BenchConfig, budget: int, policies: Optional[Iterable[str]] = None) -> list[Variant]:
    """``--policy`` names (``-grow`` = positions grow, no re-rotation; ``[k=v,...]`` = other knobs) crossed
    with ``--bias`` for infmllm."""
    out = []
    for name in policies or cfg.policies:
        base, grow, knobs = parse_policy(name)
        if base == "infmllm" and "bias" not in knobs:
            for bias in cfg.biases:
                label = name if float(bias) == 0 else f"{name.removesuffix('-grow')}-b{float(bias):g}" + (
                    "-grow" if grow else "")
                out.append(Variant(label, base, budget, float(bias), not grow, knobs))
        else:
            bias = float(knobs.pop("bias", 0.0))
            out.append(Variant(name, base, budget, bias, not grow, knobs))
    return out


def raw_stream(lm, vcfg):
    """A stream without the chat framing: token i of the text is stream token i."""
    from infmllm_ros.engine import Stream

    stream = Stream(lm, vcfg)
    stream._started = stream._in_user_turn = True
    return stream


def append_in_chunks(stream, ids, chunk: int, bar=None) -> None:
    """Append token ids ``[1, n]`` to ``stream`` in ``chunk``-token pieces (ticking ``bar`` per token)."""
    from infmllm_ros.engine import Chunk

    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        stream.append_chunk(Chunk(input_ids=piece))
        if bar is not None:
            bar.update(piece.shape[1])


def greedy_decode(stream, logits, steps: int, append_last: bool = True) -> list[int]:
    """``steps`` greedy tokens from next-token ``logits``, each appended to the stream with the cache in
    decoding mode: ``Stream.ask``'s own loop (``Stream.generate``), without its chat framing, its
    repetition penalty or its stop at an end token. ``append_last=False`` leaves the last one for the
    caller to append (with what follows it, in one forward pass)."""
    return stream.generate(logits, steps, repetition_penalty=1.0, stop_at_eos=False, append_last=append_last).tokens


#: the StreamConfig fields that decide what a policy keeps, written out in full with every result (a label
#: names only the knobs given, and the defaults behind it change as measurements choose new ones)
EVICTION_SETTINGS = ("sinks", "recent", "retrieval_window", "bias", "per_head", "pool", "decay", "carry", "granularity",
                     "bias_frames", "keep_latest_per_camera", "h2o_recent_ratio", "rerotate")


def record(cfg: BenchConfig, lm, variant: Variant, **figures) -> dict:
    """One result line: who/what/where, then the figures."""
    from infmllm_ros.engine.policies import POLICIES

    # a peer (plain transformers, llama.cpp) has no cache policy and no settings
    settings = variant.stream_config(cfg) if variant.policy in POLICIES else None
    return {
        "bench": cfg.command, "policy": variant.label, "base_policy": variant.policy, "budget": variant.budget,
        "bias": variant.bias, "rerotate": variant.rerotate, "knobs": dict(variant.knobs),
        "settings": settings and {name: getattr(settings, name) for name in EVICTION_SETTINGS}, "chunk": cfg.chunk,
        "model": lm.name, "device": str(lm.device), "dtype": dtype_name(lm),
        "quantize": getattr(lm, "quantize", "none"), "compile": cfg.compile,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "quick": cfg.quick, **figures,
    }


# -- output ------------------------------------------------------------------------------------------------


def progress(total: Optional[int], desc: str, unit: str = "tok"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0, dynamic_ncols=True, leave=False)


def emit(cfg: BenchConfig, line: dict) -> None:
    """Print one result (JSON line with --json, else a short readable line)."""
    if cfg.json:
        print(json.dumps(line, default=_jsonable), flush=True)
    else:
        keys = [k for k in line if isinstance(line[k], (int, float, str)) and k not in ("machine", "date", "bench")]
        print("  ".join(f"{k}={_short(line[k])}" for k in keys), flush=True)


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_results(cfg: BenchConfig, results: list[dict], extra: Optional[dict] = None) -> Path:
    """Write ``<out>/<command>_<UTC stamp>.json`` holding the config and the results."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{cfg.command}{'_quick' if cfg.quick else ''}_{stamp}.json"
    payload = {"config": asdict(cfg), "machine": machine_info(), "saved": stamp, "results": results, **(extra or {})}
    path.write_text(json.dumps(payload, indent=1, default=_jsonable))
    return path


def finite(x: float) -> float:
    """JSON has no inf/nan: clamp to a large finite number (and say so in the docs)."""
    if x != x:
        return -1.0
    return float(min(x, 1e30))


def plot_path(cfg: BenchConfig, name: str) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}{'_quick' if cfg.quick else ''}.png"


def run_label(result: dict) -> str:
    """What every plot's title says about the run: model, dtype, machine, date."""
    return f"{result['model']} {result['dtype']} on {result['machine']}; {result['date'][:10]}"


def save_figure(fig, cfg: BenchConfig, name: str) -> Path:
    """Lay out, write ``<out>/<name>.png`` and close ``fig``."""
    fig.tight_layout()
    path = plot_path(cfg, name)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
