"""The node's parameters: names, defaults, descriptors, presets, refusals (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")

from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from infmllm_ros.ros import params as P  # noqa: E402
from infmllm_ros.ros.params import (  # noqa: E402
    NodeSettings,
    ParameterError,
    check_settings,
    declare_node_parameters,
    preset_defaults,
    read_params_file,
)

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]
STREAM_YAML = REPO / "config" / "stream.yaml"

EXPECTED = {
    "model.preset", "model.name", "model.gguf_file", "model.device", "model.dtype",
    "model.trust_remote_code", "model.compile", "model.quantize", "encoder.type", "encoder.image_size", "encoder.max_pixels",
    "encoder.min_pixels", "encoder.detector.model", "encoder.detector.config", "encoder.detector.names",
    "encoder.detector.input_size", "encoder.detector.score_threshold", "encoder.detector.nms_threshold",
    "encoder.tracker.lost_s", "encoder.tracker.match_buffer", "cache.policy", "cache.budget_tokens", "cache.budget_bytes",
    "cache.max_chunk_tokens", "cache.sinks", "cache.recent", "cache.bias", "cameras.names",
    "sample_rate_hz", "scene.period_s", "scene.prompt", "scene.max_new_tokens",
    "query.max_new_tokens", "query.max_question_chars", "query.busy_policy", "query.queue_size",
    "query.timeout_s", "diagnostics.period_s",
}


def bare_node(ctx, overrides=(), cli_args=None, namespace=None):
    return Node("infmllm", context=ctx, parameter_overrides=list(overrides), cli_args=cli_args,
                namespace=namespace, start_parameter_services=False, enable_rosout=False)


def declare(ctx, overrides=(), **kw):
    node = bare_node(ctx, overrides, **kw)
    try:
        settings, guard = declare_node_parameters(node)
    except BaseException:
        node.destroy_node()
        raise
    return node, settings, guard


def refusal(ctx, **values) -> str:
    node = bare_node(ctx, [Parameter(k.replace("__", "."), value=v) for k, v in values.items()])
    try:
        with pytest.raises(ParameterError) as info:
            declare_node_parameters(node)
        return str(info.value)
    finally:
        node.destroy_node()


# -- the specs themselves (plain Python) ---------------------------------------------


def test_every_parameter_named_once_with_a_description():
    names = [s.name for s in P.STATIC_SPECS]
    assert len(names) == len(set(names))
    assert EXPECTED <= set(names)
    assert names[0] == "model.preset"  # the preset supplies the others' defaults
    for spec in P.describe_parameters(["front"]):
        assert spec.description.strip(), spec.name


def test_compile_and_quantize_are_checked_before_the_model_loads(ros_context):
    reason = refusal(ros_context, model__quantize="int8", model__dtype="bfloat16", model__device="cpu")
    assert "model.quantize int8" in reason and "float32" in reason
    assert "model.compile must be one of" in refusal(ros_context, model__compile="sometimes")
    assert "model.quantize must be one of" in refusal(ros_context, model__quantize="int2")
    reason = refusal(ros_context, model__quantize="int4", model__device="cuda")
    assert "model.quantize int4" in reason and "CPU" in reason


def test_what_cannot_change_live_is_read_only():
    for spec in P.describe_parameters(["front"]):
        fixed = (spec.name.split(".")[0] in ("model", "encoder", "cache", "cameras")
                 or spec.name == "memory.state_file")  # loaded once, at start-up
        assert spec.read_only == fixed, spec.name


def test_defaults_make_valid_settings():
    s = NodeSettings.from_values({"cameras.names": ["front"]})
    assert check_settings(s) is None
    assert s.model.name == "smollm2" and s.model.trust_remote_code is False
    assert s.cache.policy == "infmllm" and s.cache.budget_tokens == 1024
    assert s.cameras[0].topic == "front/image_raw" and s.cameras[0].transport == "raw"
    assert s.scene.period_s == 0.0  # scenes off unless asked for
    assert s.query.busy_policy == "queue"
    assert NodeSettings.from_values(s.to_values()) == s


def test_cache_settings_map_onto_the_engine_config():
    engine = pytest.importorskip("infmllm_ros.engine")
    cfg = NodeSettings.from_values({"cache.policy": "h2o", "cache.budget_tokens": 300}).stream_config()
    assert isinstance(cfg, engine.StreamConfig)
    assert (cfg.policy, cfg.budget_tokens) == ("h2o", 300)
    cfg = NodeSettings.from_values({"cache.pool": 5, "cache.decay": 0.9, "cache.carry": "max",
                                    "cache.granularity": "chunk"}).stream_config()
    assert (cfg.pool, cfg.decay, cfg.carry, cfg.granularity) == (5, 0.9, "max", "chunk")
    # The node keeps each camera's newest line (the engine, whose baselines follow their papers, does not).
    assert NodeSettings.from_values({}).stream_config().keep_latest_per_camera is True
    assert engine.StreamConfig().keep_latest_per_camera is False
    cfg = NodeSettings.from_values({"cache.bias_frames": False, "cache.decay": 0.97}).stream_config()
    assert (cfg.bias_frames, cfg.decay) == (False, 0.97)
    cfg = NodeSettings.from_values({"cache.keep_latest_per_camera": False}).stream_config()
    assert cfg.keep_latest_per_camera is False


def test_the_cache_defaults_are_the_engines_measured_ones():
    """The node, every preset and the engine use the setting docs/benchmarks.md section 11 chose (bias 1:
    multi-round recall and perplexity), with the refinements off (section 11c: frames off the bias's clock
    cost free-form answers)."""
    engine = pytest.importorskip("infmllm_ros.engine")
    ours = NodeSettings.from_values({}).stream_config()
    theirs = engine.StreamConfig(budget_tokens=1024)
    for name in ("policy", "bias", "sinks", "recent", "retrieval_window", "pool", "decay", "carry", "granularity",
                 "bias_frames"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.policy, ours.bias) == ("infmllm", 1.0)
    for preset in sorted((REPO / "config" / "models").glob("*.yaml")):
        values = preset_defaults(str(preset))
        for name in ("bias", "decay", "bias_frames"):
            assert values.get(f"cache.{name}", getattr(ours, name)) == getattr(ours, name), (preset.name, name)


@pytest.mark.parametrize("values, words", [
    ({"cache.policy": "lru"}, "cache.policy must be one of"),
    ({"sample_rate_hz": 0.0}, "sample_rate_hz must be >="),
    ({"query.busy_policy": "drop"}, "query.busy_policy must be one of"),
    ({"cameras.names": []}, "cameras.names is empty"),
    ({"cameras.names": ["a", "a"]}, "appears twice"),
    ({"cameras.names": ["1cam"]}, "is not valid"),
    ({"cameras.names": ["a", "b"], "cameras.a.topic": "/x", "cameras.b.topic": "/x"},
     "same topic"),
    ({"cameras.front.topic": "/bad topic"}, "not a valid topic name"),
    ({"cameras.front.transport": "theora"}, "transport must be one of"),
    ({"cache.budget_tokens": 0, "cache.policy": "window"}, "needs a budget"),
    ({"query.max_new_tokens": 256}, "must be below cache.max_chunk_tokens"),
    ({"scene.prompt": "  "}, "scene.prompt is empty"),
    ({"cache.pool": 4}, "pool must be an odd integer"),
    ({"cache.granularity": "frame"}, "cache.granularity must be one of"),
    ({"cache.decay": 1.0}, "cache.decay must be <="),
    ({"cache.carry": "max"}, "cache.carry 'max' needs cache.decay > 0"),
    ({"cache.bias_frames": False}, "cache.bias_frames false needs cache.decay > 0"),
    ({"encoder.detector.model": "/no/such/model.onnx", "encoder.detector.names": "/no/such.names"},
     "'/no/such/model.onnx' does not exist"),
    # a model file that is there, without its names file
    ({"encoder.detector.model": __file__}, "encoder.detector.names"),
    ({"encoder.detector.input_size": 300}, "multiple of 32"),
    ({"encoder.detector.score_threshold": 0.0}, "encoder.detector.score_threshold must be >="),
    ({"encoder.tracker.lost_s": 0.0}, "encoder.tracker.lost_s must be >="),
])
def test_bad_settings_have_a_reason(values, words):
    values = {"cameras.names": ["front"], **values}
    reason = check_settings(NodeSettings.from_values(values))
    assert reason and words in reason, reason


def test_detector_files_are_checked_before_any_model_loads(tmp_path):
    """A truncated weights file is refused by the settings check (no model, no OpenCV network)."""
    detector = pytest.importorskip("infmllm_ros.perception.detector")
    try:
        cfg, weights, names = detector.bundled_yolov3_tiny()
    except detector.DetectorLoadError as err:
        pytest.skip(str(err))
    cut = tmp_path / "cut.weights"
    cut.write_bytes(weights.read_bytes()[:4096])
    values = {"cameras.names": ["front"], "encoder.detector.model": str(cut),
              "encoder.detector.config": str(cfg), "encoder.detector.names": str(names)}
    reason = check_settings(NodeSettings.from_values(values))
    assert reason.startswith("encoder.detector.*: ") and str(cut) in reason and "truncated" in reason
    values["encoder.detector.model"] = str(weights)
    s = NodeSettings.from_values(values)
    assert check_settings(s) is None and s.encoder.detector.model == str(weights)
    assert NodeSettings.from_values(s.to_values()) == s
    values["encoder.type"] = "vlm"  # the detector is not used: not checked
    values["encoder.detector.model"] = str(cut)
    assert check_settings(NodeSettings.from_values(values)) is None


# -- presets and params files ------------------------------------------------------


def test_presets_are_valid_params_files():
    presets = sorted((REPO / "config" / "models").glob("*.yaml"))
    stems = {p.stem for p in presets}
    assert {"smollm2_offline", "smolvlm_256m", "smolvlm_500m", "qwen2_5_vl_3b"} <= stems
    for p in presets:
        values = preset_defaults(str(p))
        assert values["model.name"], p.name
        s = NodeSettings.from_values({**values, "cameras.names": ["front"]})
        assert check_settings(s) is None, (p.name, check_settings(s))
    assert preset_defaults("smolvlm-256m")["encoder.type"] == "vlm"
    assert preset_defaults("qwen2_5_vl_3b")["model.name"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert preset_defaults("smollm2-offline")["encoder.type"] == "offline"


def test_preset_with_unknown_parameter_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    model:\n      name: x\n      colour: red\n")
    with pytest.raises(ParameterError, match="unknown parameter 'model.colour'"):
        preset_defaults(str(bad))
    bad.write_text("/**:\n  ros__parameters:\n    cache:\n      budget_tokens: lots\n")
    with pytest.raises(ParameterError, match="cache.budget_tokens must be a int"):
        preset_defaults(str(bad))


def test_stream_yaml_is_the_offline_default():
    values = read_params_file(STREAM_YAML)
    assert values["model.preset"] == "smollm2-offline"
    assert values["cameras.names"] == ["front"]
    assert values["cameras.front.topic"] == "camera/image_raw"
    assert values["cameras.front.transport"] == "raw"
    assert values["sample_rate_hz"] == 1.0
    assert values["cache.budget_tokens"] == 1024 and values["cache.policy"] == "infmllm"
    for name in values:
        assert P.spec_for(name) is not None, name


# -- on a real (bare) node ---------------------------------------------------------


def test_declared_with_descriptors(ros_context):
    node, settings, _ = declare(ros_context)
    try:
        declared = set(node._parameters)  # noqa: SLF001
        assert EXPECTED | {"cameras.front.topic", "cameras.front.transport",
                           "cameras.front.frame_id"} <= declared
        d = node.describe_parameter("cache.budget_tokens")
        assert d.read_only and d.description and d.integer_range[0].from_value == 0
        d = node.describe_parameter("sample_rate_hz")
        assert not d.read_only and d.floating_point_range[0].from_value > 0
        d = node.describe_parameter("query.busy_policy")
        assert "queue" in d.additional_constraints and "reject" in d.additional_constraints
        assert node.describe_parameter("model.name").read_only
        assert settings.camera_names == ["front"]
    finally:
        node.destroy_node()


def test_per_camera_parameters_follow_cameras_names(ros_context):
    node, s, _ = declare(ros_context, [
        Parameter("cameras.names", value=["front", "rear"]),
        Parameter("cameras.rear.topic", value="/rear/image_raw/compressed"),
        Parameter("cameras.rear.transport", value="compressed"),
        Parameter("cameras.rear.frame_id", value="rear_optical"),
    ])
    try:
        assert s.camera_names == ["front", "rear"]
        rear = s.camera("rear")
        assert (rear.topic, rear.transport, rear.frame_id) == (
            "/rear/image_raw/compressed", "compressed", "rear_optical")
        assert node.get_parameter("cameras.front.topic").value == "front/image_raw"
    finally:
        node.destroy_node()


@pytest.mark.parametrize("values, words", [
    ({"cache__policy": "lru"}, "cache.policy must be one of"),
    ({"sample_rate_hz": 0.0}, "sample_rate_hz"),
    ({"query__busy_policy": "drop"}, "query.busy_policy must be one of"),
    ({"cameras__names": ["ok", "not ok"]}, "'not ok'"),
    ({"model__preset": "no_such_model"}, "not found"),
    ({"sample_rate_hz": "fast"}, "must be of type float"),
    ({"cache__budget_tokens": 0}, "needs a budget"),
    ({"query__max_new_tokens": 300}, "must be below cache.max_chunk_tokens"),
    ({"encoder__detector__model": "/missing.weights", "encoder__detector__config": "/missing.cfg",
      "encoder__detector__names": "/missing.names"}, "'/missing.weights' does not exist"),
])
def test_bad_values_stop_the_start_with_a_reason(ros_context, values, words):
    assert words in refusal(ros_context, **values)


def test_integer_for_a_double_is_accepted(ros_context):
    node, s, _ = declare(ros_context, [Parameter("sample_rate_hz", value=2)])
    try:
        assert s.sample_rate_hz == 2.0
        assert node.set_parameters([Parameter("scene.period_s", value=5)])[0].successful
        assert node.get_parameter("scene.period_s").value == 5.0
    finally:
        node.destroy_node()


def test_live_changes_validated_and_applied(ros_context):
    seen = []
    node = bare_node(ros_context)
    try:
        settings, guard = declare_node_parameters(node, seen.append)

        def set_(name, value):
            return node.set_parameters([Parameter(name, value=value)])[0]

        r = set_("query.busy_policy", "drop")
        assert not r.successful and "query.busy_policy must be one of" in r.reason
        r = set_("sample_rate_hz", -1.0)
        assert not r.successful and "sample_rate_hz" in r.reason
        r = set_("cache.budget_tokens", 10)
        assert not r.successful and "read-only" in r.reason
        r = set_("model.name", "other")
        assert not r.successful and "read-only" in r.reason
        r = set_("query.max_new_tokens", 1000)  # crosses cache.max_chunk_tokens
        assert not r.successful and "max_chunk_tokens" in r.reason
        r = set_("scene.prompt", "")
        assert not r.successful and "scene.prompt is empty" in r.reason
        assert seen == [] and guard.settings == settings  # nothing applied so far

        assert set_("query.busy_policy", "reject").successful
        assert set_("sample_rate_hz", 4.0).successful
        assert guard.settings.query.busy_policy == "reject"
        assert seen[-1].sample_rate_hz == 4.0 and len(seen) == 2
    finally:
        node.destroy_node()


def test_params_file_and_preset_through_rcl(ros_context):
    """config/stream.yaml as `--params-file`, as `ros2 run`/launch pass it, in a namespace."""
    node, s, _ = declare(ros_context, cli_args=["--ros-args", "--params-file", str(STREAM_YAML)],
                         namespace="/robot1")
    try:
        preset = preset_defaults("smollm2-offline")
        assert s.model.preset == "smollm2-offline"
        assert s.model.name == preset["model.name"] == "smollm2"
        assert s.encoder.type == "offline"
        assert s.scene.prompt == preset["scene.prompt"]  # from the preset
        assert s.scene.period_s == 20.0  # from stream.yaml
        assert s.camera("front").topic == "camera/image_raw"
        assert s.cache.budget_tokens == 1024
    finally:
        node.destroy_node()


def test_explicit_parameters_override_the_preset(ros_context):
    node, s, _ = declare(ros_context, [Parameter("model.preset", value="smolvlm-256m"),
                                       Parameter("cache.budget_tokens", value=512)])
    try:
        assert s.model.name == "HuggingFaceTB/SmolVLM-256M-Instruct"  # preset
        assert s.encoder.type == "vlm" and s.encoder.image_size == 512  # preset
        assert s.cache.budget_tokens == 512  # explicit beats preset
    finally:
        node.destroy_node()


def test_params_file_sections_follow_rcl_matching(tmp_path):
    from infmllm_ros.ros.params import section_applies, unmatched_params_files

    assert section_applies("/**", "/watcher") and section_applies("/**", "/r1/watcher")
    assert section_applies("/**/infmllm", "/r1/infmllm") and section_applies("infmllm", "/infmllm")
    assert not section_applies("/**/infmllm", "/watcher")
    assert section_applies("/r1/*", "/r1/x") and not section_applies("/r1/*", "/r1/a/x")
    assert not section_applies("/r1/infmllm", "/r2/infmllm")
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text("/**/infmllm:\n  ros__parameters:\n    sample_rate_hz: 2.0\n")
    args = ["--ros-args", "--params-file", str(keyed), "--params-file", str(STREAM_YAML)]
    assert unmatched_params_files(args, "/infmllm") == []
    assert unmatched_params_files(args, "/watcher") == [(str(keyed), ["/**/infmllm"])]
    # the shipped file applies whatever the node is called
    assert read_params_file(STREAM_YAML, "/r1/watcher")["model.preset"] == "smollm2-offline"
# -- start-up errors: one line, exit 2, before the model load ------------------------


def test_misspelt_keys_are_warned_with_the_closest_name(ros_context, tmp_path, capfd):
    f = tmp_path / "typo.yaml"
    f.write_text("infmllm:\n  ros__parameters:\n    cache:\n      budjet_tokens: 100\n"
                 "    cameras:\n      rear:\n        topic: /rear/image_raw\n")
    node, s, guard = declare(ros_context, [Parameter("query.timeout", value=3.0)],
                             cli_args=["--ros-args", "--params-file", str(f), "-p", "use_sim_time:=true"])
    try:
        unknown = dict(guard.unknown)
        assert set(unknown) == {"cache.budjet_tokens", "cameras.rear.topic", "query.timeout"}
        assert "cache.budget_tokens" in unknown["cache.budjet_tokens"]
        assert "query.timeout_s" in unknown["query.timeout"]
        assert "not in cameras.names" in unknown["cameras.rear.topic"]
        assert s.cache.budget_tokens == 1024  # the default: the misspelt value went nowhere
        err = capfd.readouterr().err
        assert "ignoring unknown parameter 'cache.budjet_tokens': did you mean 'cache.budget_tokens'?" in err
    finally:
        node.destroy_node()


STARTUP_CHILD = ("import sys\nfrom infmllm_ros.ros.node import main\n"
                 "sys.exit(main(['infmllm_node', '--ros-args', '-r', '__ns:=/startup'] + sys.argv[1:]))")


def _start(*args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", STARTUP_CHILD, *args], capture_output=True, text=True,
                          timeout=240, env=dict(os.environ))


@pytest.mark.parametrize("case, words", [
    ("missing-file", "params file {tmp}/nope.yaml does not exist"),
    ("malformed-yaml", "is not valid YAML at line 4"),
    ("not-ros-parameters", "has no ros__parameters"),
    ("missing-model-folder", "model.name: model folder {tmp}/no_model does not exist"),
    ("missing-gguf", "GGUF file 'm.gguf' is not in the model folder"),
    ("budget-below-sinks-and-recent", "cache.budget_tokens: budget of 60 tokens leaves no room"),
    ("budget-below-a-chunk", "cannot keep 4 sinks + 64 recent tokens + a whole chunk of 256"),
    ("state-file-folder-missing", "memory.state_file: folder {tmp}/gone does not exist"),
    # the empty file is named first, before the names file it also lacks
    ("empty-detector-weights", "detector model file '{tmp}/empty.weights' is empty"),
    ("garbage-onnx-detector", "{tmp}/garbage.onnx"),
])
def test_start_up_errors_are_one_line_with_exit_2_before_the_model_load(interfaces, tmp_path, case, words):
    bad = tmp_path / "bad.yaml"
    bad.write_text("infmllm:\n  ros__parameters:\n    cache: {budget_tokens: 100\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("cache:\n  budget_tokens: 100\n")
    args = {
        "missing-file": ["--params-file", f"{tmp_path}/nope.yaml"],
        "malformed-yaml": ["--params-file", str(bad)],
        "not-ros-parameters": ["--params-file", str(flat)],
        "missing-model-folder": ["-p", f"model.name:={tmp_path}/no_model"],
        "missing-gguf": ["-p", f"model.name:={tmp_path}", "-p", "model.gguf_file:=m.gguf"],
        "budget-below-sinks-and-recent": ["-p", "cache.budget_tokens:=60"],
        "budget-below-a-chunk": ["-p", "cache.budget_tokens:=200"],
        "state-file-folder-missing": ["-p", f"memory.state_file:={tmp_path}/gone/memory.pt"],
        "empty-detector-weights": ["-p", f"encoder.detector.model:={tmp_path}/empty.weights"],
        "garbage-onnx-detector": ["-p", f"encoder.detector.model:={tmp_path}/garbage.onnx",
                                  "-p", f"encoder.detector.names:={tmp_path}/coco.names"],
    }[case]
    (tmp_path / "empty.weights").write_bytes(b"")
    (tmp_path / "garbage.onnx").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "coco.names").write_text("person\ncar\n")
    proc = _start(*args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "loading model" not in proc.stderr  # failed before the load
    assert lines and lines[-1].startswith("[infmllm] cannot start: "), proc.stderr[-3000:]
    assert words.format(tmp=tmp_path) in lines[-1]
