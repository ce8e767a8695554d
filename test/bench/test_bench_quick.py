"""Each `infmllm-bench` subcommand's --quick mode, in-process, on the one SmolLM2 load of the session.

Checks that results are produced and well formed (keys, finite numbers, one
line per policy variant, config saved with them); no timing asserts.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from infmllm_ros.bench import cli
from infmllm_ros.bench.common import load_config, variants

pytestmark = [pytest.mark.model, pytest.mark.slow]

COMMON = ("bench", "policy", "budget", "tokens", "model", "device", "dtype", "date", "machine")
FIGURES = {
    "ppl": ("ppl", "segments"),
    "recall": ("accuracy", "per_distance", "free_form_rate", "single_accuracy", "multi_accuracy"),
    "speed": ("prefill_tok_s", "decode_tok_s", "query_s"),
    "memory": ("peak_mb", "latency_ms", "memory_mb"),
    "sceneqa": ("accuracy", "ci_low", "ci_high", "free_form_rate", "prior_accuracy", "by_bucket", "asked"),
}


def _numbers(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


def _run(command, tmp_path, capsys, lm, *extra):
    out = tmp_path / command
    assert cli.main([command, "--quick", "--json", "--plot", "--out", str(out), *extra], lm=lm) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    saved = list(out.glob(f"{command}_quick_*.json"))
    assert len(saved) == 1
    payload = json.loads(saved[0].read_text())
    assert payload["config"]["command"] == command and payload["config"]["quick"] is True
    assert payload["results"] == lines
    assert all(p.endswith(".png") and (out / p.split("/")[-1]).is_file() for p in payload.get("plots", []))
    return lines, payload["config"]


@pytest.mark.parametrize("command", ["ppl", "recall", "speed", "memory", "sceneqa"])
def test_quick_mode_gives_one_well_formed_line_per_policy(command, smollm2, shared_data, tmp_path, capsys):
    lines, config = _run(command, tmp_path, capsys, smollm2)
    cfg = load_config(command, {}, quick=True)
    expected = [v.label for b in cfg.budgets for v in variants(cfg, b)]
    if command == "speed":  # plain transformers ran beside them, as the yardstick
        expected += ["transformers"]
    assert [x["policy"] for x in lines] == expected
    for line in lines:
        for key in COMMON + FIGURES[command]:
            assert key in line, (command, key)
        assert all(math.isfinite(x) for x in _numbers(line)), line
    if command == "ppl":
        assert all(x["ppl"] > 1 and len(x["segments"]) >= 1 for x in lines)
    if command == "recall":
        assert all(0 <= x["accuracy"] <= 1 and 0 <= x["free_form_rate"] <= 1 for x in lines)
        assert lines[0]["best_bias"] in config["biases"]
        for x in lines:  # accuracy by distance (single fact) and by lag (multi-round)
            assert list(x["single_by_distance"]) == [str(d) for d in config["distances"]]
            assert sum(v["trials"] for v in x["single_by_distance"].values()) == x["single_trials"]
            assert set(x["multi_by_lag"]) <= {str(g) for g in config["lags"]} and x["multi_questions"] >= 1
            assert all(v["mean_distance"] > 0 and len(v["ranks"]) == v["asked"] for v in x["multi_by_lag"].values())
    if command == "speed":
        assert all(x["prefill_tok_s"] > 0 and x["decode_tok_s"] > 0 for x in lines)
        assert "vs_h2o" in next(x for x in lines if x["policy"] == "infmllm")
        assert all(set(x["vs_transformers"]) == {"prefill", "decode"} for x in lines if x["policy"] != "transformers")
    if command == "sceneqa":
        for x in lines:
            assert 0 <= x["ci_low"] <= x["accuracy"] <= x["ci_high"] <= 1 and x["asked"] + x["not_held"] >= 6
            assert sum(b["asked"] for b in x["by_bucket"].values()) == x["asked"]
            assert x["scene_descriptions"] >= 1  # the node's periodic description stays in the stream
            # what the policy kept of the asked lines: a share, and the kept questions are a subset
            assert 0 <= x["line_held"] <= 1 and 0 <= x["asked_kept"] <= x["asked"]
            assert sum(b["asked_kept"] for b in x["by_bucket"].values()) == x["asked_kept"]
        full = next(x for x in lines if x["policy"] == "full")
        assert full["line_held"] == 1.0 and full["asked_kept"] == full["asked"]  # it holds all its episode
        capped = next(x for x in lines if x["policy"] == "infmllm")
        assert capped["tokens_held_end"] <= capped["budget"] + config["chunk"]
    if command == "memory":
        capped = next(x for x in lines if x["policy"] == "infmllm")
        assert max(capped["tokens_held"]) <= capped["budget"] + config["chunk"]
        assert len(capped["latency_ms"]) == capped["frames"] > 0


def test_speed_of_an_int4_model_is_read_against_plain_transformers_on_both_weights(smollm2, shared_data, tmp_path,
                                                                                  capsys):
    import copy

    from infmllm_ros.engine import LoadedModel
    from infmllm_ros.engine.int4 import int4_kernel_available
    from infmllm_ros.engine.models import quantize_model

    if not int4_kernel_available():
        pytest.skip(f"torch {torch.__version__} has no int4 CPU kernel")
    int4 = LoadedModel(model=quantize_model(copy.deepcopy(smollm2.model), "int4"), tokenizer=smollm2.tokenizer,
                       name=smollm2.name, quantize="int4")
    lines, _ = _run("speed", tmp_path, capsys, int4)
    assert [x["policy"] for x in lines][-2:] == ["transformers", "transformers_fp32"]
    assert [x["quantize"] for x in lines] == ["int4"] * (len(lines) - 1) + ["none"]
    for x in lines[:-2]:
        assert set(x["vs_transformers"]) == set(x["vs_transformers_fp32"]) == {"prefill", "decode"}


def test_quant_gives_the_int8_and_int4_perplexity_next_to_their_speed(smollm2, shared_data, tmp_path, capsys):
    from infmllm_ros.engine.int4 import int4_kernel_available

    lines, _ = _run("quant", tmp_path, capsys, smollm2)
    expected = ["float32", "int8"] + (["int4"] if int4_kernel_available() else [])
    assert [x["precision"] for x in lines] == expected
    assert [x["quantize"] for x in lines] == ["none"] + expected[1:]
    for line in lines:
        assert line["ppl"] > 1 and line["ppl_tokenwise"] > 1
        assert line["prefill_tok_s"] > 0 and line["decode_tok_s"] > 0
        assert all(math.isfinite(x) for x in _numbers(line))
    for line in lines[1:]:
        assert set(line["vs_float32"]) == {"ppl", "ppl_tokenwise", "prefill", "decode"}
    if "int4" in expected:
        # prefill chunks take the float weights, token by token the GGUF's own 4-bit blocks
        assert lines[2]["ppl"] == pytest.approx(lines[0]["ppl"], rel=1e-4)
        assert lines[2]["ppl_tokenwise"] == pytest.approx(lines[0]["ppl_tokenwise"], rel=0.01)


def test_gpu_script_runs_its_vlm_part_tiny_on_cpu(smollm2, shared_data, tmp_path, capsys):
    if importlib.util.find_spec("infmllm_ros.perception.random_vlm") is None:
        pytest.skip("random_vlm not present")
    lines, _ = _run("gpu", tmp_path, capsys, smollm2)
    assert {(x["family"], x["base_policy"]) for x in lines} == {(f, p) for f in ("qwen2_5_vl", "idefics3")
                                                                 for p in ("infmllm", "full")}
    for line in lines:
        assert line["frames_per_s"] > 0 and line["peak_mb"] > 0 and line["frame_tokens"] > 0
        assert all(math.isfinite(x) for x in _numbers(line))


def test_cli_overrides_and_bad_values():
    cfg = cli.parse(["ppl", "--quick", "--budget", "64", "--budget", "96", "--bias", "0.5",
                     "--policy", "streamingllm-grow", "--policy", "infmllm", "--set", "segment=64"])
    assert cfg.budgets == [64, 96] and cfg.segment == 64
    assert [v.label for v in variants(cfg, 64)] == ["streamingllm-grow", "infmllm-b0.5"]
    assert [v.rerotate for v in variants(cfg, 64)] == [False, True]
    recall = cli.parse(["recall", "--quick", "--distance", "300", "--distance", "900", "--set", "lags=[2, 5]"])
    assert recall.distances == [300, 900] and recall.lags == [2, 5]
    with pytest.raises(ValueError, match="distances and lags"):
        cli.parse(["recall", "--distance", "0"])
    knobs = cli.parse(["ppl", "--quick", "--policy", "infmllm[pool=5,granularity=chunk]", "--bias", "0",
                       "--bias", "1"])
    assert [(v.label, v.knobs, v.bias) for v in variants(knobs, 64)] == [
        ("infmllm[pool=5,granularity=chunk]", {"pool": 5, "granularity": "chunk"}, 0.0),
        ("infmllm[pool=5,granularity=chunk]-b1", {"pool": 5, "granularity": "chunk"}, 1.0)]
    assert variants(knobs, 64)[0].stream_config(knobs).pool == 5
    with pytest.raises(ValueError, match="unknown stream settings"):
        cli.parse(["ppl", "--policy", "infmllm[poll=5]"])
    with pytest.raises(ValueError, match="unknown policy"):
        cli.parse(["ppl", "--policy", "lru"])
    with pytest.raises(ValueError, match="unknown bench settings"):
        cli.parse(["ppl", "--set", "nope=1"])
    # a knob's value is checked with the rest, before any model loads
    with pytest.raises(ValueError, match="at budget 64: carry 'max' needs decay"):
        cli.parse(["recall", "--quick", "--budget", "64", "--policy", "infmllm[carry=max]"])
    with pytest.raises(ValueError, match="pool must be an odd"):
        cli.parse(["ppl", "--quick", "--policy", "streamingllm", "--policy", "infmllm[pool=4]"])
    # device, dtype and quantize together, as the model load would check them
    with pytest.raises(ValueError, match="int8 on the CPU needs dtype float32, got bfloat16"):
        cli.parse(["speed", "--quick", "--dtype", "bfloat16", "--set", "quantize=int8"])
    with pytest.raises(ValueError, match="quantizes a float32 model itself"):
        cli.parse(["quant", "--quick", "--set", "quantize=auto"])
    with pytest.raises(ValueError, match="quantizes a float32 model itself"):
        cli.parse(["quant", "--quick", "--dtype", "bfloat16"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            cli.parse(["speed", "--quick", "--device", "cuda", "--set", "quantize=int4"])


def test_cli_refuses_bad_settings_in_one_line_before_loading_anything(capsys):
    # a missing input file was found only after the model had loaded, with a traceback
    for command, option in (("quant", "--text"), ("speed", "--text"), ("memory", "--video")):
        assert cli.main([command, option, "/nonexistent/input.file", "--quick"]) == 2
        assert "/nonexistent/input.file not found" in capsys.readouterr().err
    assert cli.main(["sceneqa", "--minutes", "-3"]) == 2
    assert cli.main(["recall", "--policy", "infmllm[nosuchknob=1]"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["infmllm-bench: error: minutes must be > 0, got -3.0",
                     "infmllm-bench: error: policy 'infmllm[nosuchknob=1]': unknown stream settings ['nosuchknob']"]


@pytest.mark.parametrize("argv, reason", [
    (["ppl", "--threads", "-1"], "threads must be >= 0"),
    (["ppl", "--device", "tpu"], "unknown device 'tpu'"),
    (["ppl", "--quick", "--budget", "8", "--policy", "infmllm"], "at budget 8: budget of 8 tokens leaves no room"),
    (["memory", "--minutes", "inf"], "minutes must be a finite number"),
    (["memory", "--time-limit", "-5"], "time_limit_s must be >= 0"),
    (["ppl", "--set", "chunk=2.5"], "chunk must be an integer"),
    (["ppl", "--set", "budgets=5"], "budgets must be a list"),
    (["ppl", "--set", "budgets=[64.9]"], "budgets must be a list of integers"),
    (["ppl", "--set", "budgets=[.inf]"], "budgets must be a list of integers"),
    (["ppl", "--set", "biases=0.5"], "biases must be a list"),
    (["sceneqa", "--set", "event_interval_s=5"], "event_interval_s must be a list"),
    (["ppl", "--set", "tokens=[1]"], "tokens must be an integer"),
    (["ppl", "--set", "tokens"], "needs a value"),
    (["ppl", "--set", "tokens="], "needs a value"),
    (["ppl", "--set", "policies=[]"], "policies is empty"),
    (["ppl", "--set", "policies=infmllm"], "policies must be a list"),
    (["ppl", "--set", "command=speed"], "choose it with the subcommand"),
    (["ppl", "--policy", "infmllm[policy=h2o]"], "set by the benchmark"),
    (["ppl", "--policy", "infmllm[bias=[1]]"], "bias must be a number"),
    (["ppl", "--policy", "h2o[bias=null]"], "bias must be a number"),
    (["ppl", "--config", "/nonexistent/bench.yaml"], "no config file /nonexistent/bench.yaml"),
    (["recall", "--set", "scenarios=[bogus]"], "scenarios must name"),
    (["recall", "--set", "distractors=bogus"], "distractors must be"),
])
def test_every_bad_setting_is_one_line_and_exit_2_before_any_model_loads(argv, reason, capsys):
    # Each of these once passed parse() and failed later with a traceback (TypeError, OverflowError, RuntimeError),
    # after the model had loaded, ran with something else than asked (policy=h2o under the name infmllm, the
    # built-in defaults for a missing --config), or not at all (policies=[]).
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infmllm-bench: error: ") and reason in err[0], err


def test_lists_of_numbers_take_fractions_and_lists_of_counts_do_not():
    cfg = cli.parse(["sceneqa", "--quick", "--set", "lag_buckets=[1, 2.5, 10]", "--set", "rates=[1, 2.5]"])
    assert cfg.lag_buckets == [1, 2.5, 10] and cfg.rates == [1, 2.5]
    with pytest.raises(ValueError, match="distances must be a list of integers"):
        cli.parse(["recall", "--quick", "--set", "distances=[500, 1500.5]"])


def test_a_config_file_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("common: {budgets: [\n")
    (tmp_path / "section.yaml").write_text("common: [1, 2]\n")
    for name, reason in (("list", "must be a mapping"), ("broken", "not valid YAML"), ("section", "must be a mapping")):
        assert cli.main(["ppl", "--config", str(tmp_path / f"{name}.yaml")]) == 2
        assert reason in capsys.readouterr().err


def test_sceneqa_keep_latest_per_camera_holds_every_asked_line_that_is_its_cameras_newest(smollm2, shared_data,
                                                                                        tmp_path):
    """A question asks about an event camera's newest line before its instant; unless the camera reported
    again within that second, that line is still its newest when the question comes, and with
    ``keep_latest_per_camera`` the cache holds it whole (every layer and KV head), where the same policy
    without it loses some."""
    from infmllm_ros.bench import sceneqa

    cfg = load_config("sceneqa", {"out": str(tmp_path), "budgets": [512], "biases": [0.0],
                                  "policies": ["streamingllm", "streamingllm[keep_latest_per_camera=true]"]},
                      quick=True)
    plain, pinned = sceneqa.run(cfg, smollm2)
    assert pinned["knobs"] == {"keep_latest_per_camera": True} and plain["knobs"] == {}
    assert pinned["asked"] == plain["asked"] >= 6
    lines, _ = sceneqa.build_lines(cfg)
    questions = sceneqa.make_questions(cfg, lines)
    newest = [not any(ln.camera == q.camera and q.target < ln.index <= q.after for ln in lines) for q in questions]
    assert sum(newest) >= 4
    held = {True: [], False: []}
    for bucket, label in enumerate(sceneqa.bucket_labels(cfg.lag_buckets)):
        flags = [n for q, n in zip(questions, newest) if q.bucket == bucket]
        shares = pinned["by_bucket"][label]["shares"] if flags else []
        assert len(shares) == len(flags)
        for share, flag in zip(shares, flags):
            held[flag].append(share)
    assert held[True] and all(share == 1.0 for share in held[True])
    assert plain["line_held"] < pinned["line_held"] and plain["asked_kept"] < pinned["asked_kept"]
    assert pinned["tokens_held_end"] <= 512 + cfg.chunk


def test_a_policy_knob_given_twice_is_refused():
    from infmllm_ros.bench.common import parse_policy

    with pytest.raises(ValueError, match="'keep_latest_per_camera' is given twice"):
        parse_policy("streamingllm[keep_latest_per_camera=true,keep_latest_per_camera=false]")
