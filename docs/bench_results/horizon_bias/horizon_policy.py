"""A measured candidate that was not kept (docs/benchmarks.md section 11, "A saturating bias"): Inf-MLLM with a saturating age
penalty, ``bias * min(age, horizon * budget) / budget``: tokens older than the horizon all lose the same, so
among them the attention scores alone rank (H2O's way) while the newer ones keep the bias.

It registers the policy as ``horizon`` (the horizon in budgets from ``$HORIZON``, default 1) and runs the bench CLI:

    HORIZON=1 python docs/bench_results/horizon_bias/horizon_policy.py sceneqa --minutes 4 --budget 512 \
        --policy "horizon[bias=1,keep_latest_per_camera=true]" --threads 1 --json
    HORIZON=1 python docs/bench_results/horizon_bias/horizon_policy.py recall --budget 512 \
        --set "scenarios=[multi]" --set free_form_tokens=2 --policy "horizon[bias=1]" --threads 1 --json
"""
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

from infmllm_ros.engine import policies as P


@dataclass
class Horizon(P.InfMLLM):
    name: ClassVar[str] = "horizon"
    horizon: ClassVar[float] = float(os.environ.get("HORIZON", "1.0"))  # in budgets

    def score(self, view):
        bias, self.bias = self.bias, 0.0
        try:
            s = super().score(view)
        finally:
            self.bias = bias
        if bias == 0.0:
            return s
        mean = s.mean(dim=-1, keepdim=True).clamp_min(1e-30)
        newest = view.seen.amax(dim=-1, keepdim=True)
        age = (newest - view.seen).to(s.dtype).clamp_max(self.horizon * view.budget)
        return s / mean - bias * age / float(view.budget)


P.POLICIES["horizon"] = Horizon
from infmllm_ros.bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
