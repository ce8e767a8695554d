"""A screened candidate that was not kept (docs/benchmarks.md section 11b): Inf-MLLM whose free room (the budget less
sinks, recent tokens and the new chunk) gives ``share`` to the tokens with the highest carried scores (``decay``,
no age penalty), the rest to the bias rule on the newest chunk's look. Registers share10/25/50/75 and runs the CLI:

    python share_policy.py sceneqa --minutes 4 --budget 512 --policy "share25[bias=1,decay=0.97,keep_latest_per_camera=true]" --threads 1 --json
    python share_policy.py recall --budget 512 --set "scenarios=[multi]" --set free_form_tokens=2 --policy "share25[bias=1,decay=0.97]" --threads 1 --json

(The first screen, *_share_first.json, applied the bias to the carried scores instead of the newest look.)
"""
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from infmllm_ros.engine import policies as P


@dataclass
class Share(P.InfMLLM):
    name: ClassVar[str] = "share"
    share: ClassVar[float] = 0.25

    def score(self, view):
        bias, self.bias = self.bias, 0.0
        try:
            raw = super().score(view)  # carried (decay) scores, no bias
        finally:
            self.bias = bias
        now = view.window_attention  # this chunk's look alone: the bias rule as the default policy has it
        mean = now.mean(dim=-1, keepdim=True).clamp_min(1e-30)
        newest = view.seen.amax(dim=-1, keepdim=True)
        age = (newest - view.seen).to(raw.dtype)
        biased = now / mean - bias * age / float(view.budget)
        stored = raw.shape[-1]
        sinks = min(self.sinks, view.budget)
        tail = min(self.recent + view.new_tokens, view.budget - sinks)
        room = view.budget - sinks - tail
        k = int(self.share * room)
        if k <= 0:
            return biased
        cand = (view.seen >= self.sinks)
        cand[..., stored - tail:] = False
        ranked = raw.masked_fill(~cand, -1.0)
        top = ranked.topk(min(k, stored), dim=-1).indices
        boost = torch.zeros_like(raw, dtype=torch.bool).scatter_(-1, top, True) & cand
        lift = biased.amax(dim=-1, keepdim=True) + 1.0
        return torch.where(boost, lift + raw / raw.mean(dim=-1, keepdim=True).clamp_min(1e-30), biased)


for pct in (10, 25, 50, 75):
    P.POLICIES[f"share{pct}"] = type(f"Share{pct}", (Share,), {"name": f"share{pct}", "share": pct / 100,
                                                                 "__annotations__": {}})
from infmllm_ros.bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
