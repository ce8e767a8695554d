"""A measured candidate that was not kept (docs/benchmarks.md section 11): Inf-MLLM's saddles scored by
surprise, the attention a chunk pays a token over the attention that token usually gets (its running mean
plus the chunk's mean), max-pooled over ``pool`` neighbours and carried as a fading maximum (``decay``).

It registers the policy as ``surprise`` and runs the bench CLI, so every ``infmllm-bench`` option works:

    python docs/bench_results/recall_screen/surprise_policy.py recall --budget 1024 --rounds 40 \
        --set "scenarios=[multi]" --set free_form_tokens=2 --policy "surprise[recent=600,decay=0.97,pool=7]" --json
"""
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from infmllm_ros.engine import policies as P


@dataclass
class Surprise(P.InfMLLM):
    name: ClassVar[str] = "surprise"
    rate: float = 0.2

    @property
    def token_buffers(self):
        return {"usual": P.TokenBuffer(torch.float32), "carried": P.TokenBuffer(torch.float32)}

    def score(self, view):
        a = view.window_attention.float()
        usual = view.buffers["usual"]
        first = usual <= 0
        floor = a.mean(dim=-1, keepdim=True)
        ratio = torch.where(first, torch.ones_like(a), a / (usual + floor))
        if self.pool > 1:  # a look at one token of a fact keeps its neighbours too (the paper's local window)
            ratio = torch.nn.functional.max_pool1d(ratio, self.pool, stride=1, padding=self.pool // 2)
        s = torch.maximum(ratio, self.decay * view.buffers["carried"])
        view.updates["carried"] = s
        view.updates["usual"] = torch.where(first, a, (1 - self.rate) * usual + self.rate * a)
        if self.bias:
            newest = view.seen.amax(dim=-1, keepdim=True)
            s = s / s.mean(dim=-1, keepdim=True).clamp_min(1e-9) - self.bias * (newest - view.seen).float() / view.budget
        return s


P.POLICIES["surprise"] = Surprise
from infmllm_ros.bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
