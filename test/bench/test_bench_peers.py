"""`infmllm-bench speed --peer llama.cpp` and `infmllm-bench node`, --quick, on the session's SmolLM2.

Well-formed results only (lines, keys, finite ratios, the config saved with them);
speed itself is what the full runs print, never asserted here.
"""

from __future__ import annotations

import json
import math

import pytest

from infmllm_ros.bench import cli

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _run(command, tmp_path, capsys, lm, *extra):
    out = tmp_path / command
    assert cli.main([command, "--quick", "--json", "--out", str(out), *extra], lm=lm) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    saved = list(out.glob(f"{command}_quick_*.json"))
    assert len(saved) == 1
    payload = json.loads(saved[0].read_text())
    assert payload["results"] == lines
    return lines, payload["config"]


@pytest.fixture(scope="module")
def llamacpp_python():
    from infmllm_ros.bench.peers import llamacpp_python

    try:
        return llamacpp_python(build=False)
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}: the peer's venv is built by hand or on the first full run, not by the suite")


def test_speed_with_the_llamacpp_peer_reports_ratios_to_both_references(llamacpp_python, smollm2,
                                                                        shared_data, tmp_path, capsys):
    lines, config = _run("speed", tmp_path, capsys, smollm2, "--peer", "llama.cpp")
    assert config["peer"] == "llama.cpp"
    by = {x["policy"]: x for x in lines}
    assert {"llama.cpp", "transformers", "infmllm"} <= set(by)
    peer = by["llama.cpp"]["peer"]
    assert peer["version"] == "0.3.36" and peer["n_threads"] == config["threads"]
    assert peer["n_batch"] == config["chunk"]
    for ref in ("llama.cpp", "transformers"):
        assert by[ref]["prefill_tok_s"] > 0 and by[ref]["decode_tok_s"] > 0
        assert len(by[ref]["prefill_runs"]) == config["repeats"]
    for line in lines:
        if line["policy"] in ("llama.cpp", "transformers"):
            assert not any(k.startswith("vs_") for k in line)
            continue
        for ref in ("llama.cpp", "transformers"):
            ratios = line[f"vs_{ref}"]
            assert set(ratios) == {"prefill", "decode"}
            assert all(math.isfinite(v) and v > 0 for v in ratios.values())


def test_an_unknown_peer_is_refused_with_the_choices():
    from infmllm_ros.bench.common import load_config

    with pytest.raises(ValueError, match="the one peer is 'llama.cpp'"):
        load_config("speed", {"peer": "vllm"}, quick=True)


@pytest.mark.ros
def test_node_bench_measures_the_node_beside_the_engine(smollm2, shared_data, tmp_path, capsys):
    pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")
    pytest.importorskip("infmllm_ros.srv", reason="generated interfaces not built (colcon)")
    lines, config = _run("node", tmp_path, capsys, smollm2)
    assert config["node_process"] == "inproc"
    phases = {x["phase"]: x for x in lines}
    assert set(phases) == {"engine", "node", "ratio"} and len(lines) == 3
    for name in ("engine", "node"):
        p = phases[name]
        assert p["questions"] >= 1 and all(n > 0 for n in p["generated_tokens"])
        assert p["frames_encoded"] >= 1 and p["frames_per_s"] > 0
        assert p["answer_tok_s"] > 0 and p["answer_latency_s"] > 0
    assert phases["node"]["frames_received"] >= phases["node"]["frames_encoded"]
    r = phases["ratio"]
    for key in ("answer_tok_s", "answer_latency_s", "frames_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0
