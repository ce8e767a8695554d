"""The kvpress side-by-side (benchmarks/kvpress.sh --quick) in its own virtualenv.

kvpress 0.5.5 pins transformers<5.3, so the script builds `.venv-kvpress`
(or $KVPRESS_VENV) on first use and runs our engine and the kvpress presses
in one process there. Checks the output's shape and two facts that make the
comparison mean something: kvpress's loop with no press reproduces our full
cache's perplexity on the same tokens, its StreamingLLM press (kept tokens in
order) reproduces our StreamingLLM at original positions, and its
decoding-time press keeps the cache at the budget. No timing asserts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_kvpress_quick_runs_beside_our_policies(tmp_path, shared_data):
    if os.environ.get("INFMLLM_SKIP_KVPRESS") == "1":
        pytest.skip("INFMLLM_SKIP_KVPRESS=1")
    venv = Path(os.environ.get("KVPRESS_VENV", REPO / ".venv-kvpress"))
    env = {**os.environ, "KVPRESS_VENV": str(venv), "INFMLLM_SHARED_DATA": str(shared_data)}
    script = REPO / "benchmarks" / "kvpress.sh"
    run = subprocess.run(["bash", str(script), "--quick", "--plot", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=1500)
    if run.returncode != 0 and not (venv / "bin" / "python").exists():
        pytest.skip(f"could not build the kvpress virtualenv (needs PyPI): {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    ppl = {x["policy"]: x for x in lines if x["bench"] == "ppl"}
    recall = {x["policy"]: x for x in lines if x["bench"] == "recall"}
    assert {"full", "streamingllm", "streamingllm-grow", "h2o", "infmllm", "kvpress-loop:full (no press)",
            "kvpress:streamingllm (DecodingPress)", "kvpress:snapkv (DecodingPress)"} <= set(ppl)
    assert {"streamingllm", "infmllm", "kvpress:streamingllm", "kvpress:snapkv", "kvpress:snapkv+question"} <= set(recall)
    # kvpress's pin (transformers < 5.3), not the project's transformers
    assert all(x["kvpress"] == "0.5.5" and tuple(map(int, x["transformers"].split(".")[:2])) < (5, 3) for x in lines)
    assert all(math.isfinite(x["ppl"]) and x["ppl"] > 1 for x in ppl.values())
    # the kvpress loop itself is right: without a press it is our full cache
    assert ppl["kvpress-loop:full (no press)"]["ppl"] == pytest.approx(ppl["full"]["ppl"], rel=1e-4)
    # kvpress's StreamingLLM, kept tokens in order, keeps what ours keeps at the same (original) positions
    assert ppl["kvpress:streamingllm (DecodingPress, in order)"]["ppl"] == pytest.approx(
        ppl["streamingllm-grow"]["ppl"], rel=1e-4)
    budget, chunk = ppl["streamingllm"]["budget"], ppl["streamingllm"]["chunk"]
    for name in (n for n in ppl if "DecodingPress" in n):
        assert ppl[name]["tokens_held_max"] <= budget + chunk
        assert ppl[name]["ppl"] != pytest.approx(ppl["full"]["ppl"], rel=1e-6)  # the press did evict
    for x in recall.values():
        assert 0 <= x["accuracy"] <= 1 and all(1 <= r <= 10 for d in x["single_by_distance"].values()
                                                for r in d["ranks"])
    assert all(d["kept"] <= recall["kvpress:snapkv"]["budget"] for d in
               recall["kvpress:snapkv"]["single_by_distance"].values())
    assert list(tmp_path.glob("kvpress_quick_*.json"))
    assert (tmp_path / "kvpress_ppl.png").is_file() and (tmp_path / "kvpress_recall.png").is_file()
