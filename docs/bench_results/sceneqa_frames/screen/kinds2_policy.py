"""A screened variant (docs/benchmarks.md section 11b): ``bias_frames=False`` with the system prompt (its first
41 tokens) ranked like the frames, by carried attention without the age penalty; 0.68 against 0.667 at budget 512,
not kept. Needs keep_latest_per_camera (it reads the frames from the source buffer):

    python kinds2_policy.py sceneqa --minutes 4 --budget 512 --policy "kinds2[bias=1,decay=0.97,keep_latest_per_camera=true]" --threads 1 --json
"""
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from infmllm_ros.engine import policies as P


@dataclass
class Kinds(P.InfMLLM):
    name: ClassVar[str] = "kinds2"

    @property
    def token_buffers(self):
        b = dict(super().token_buffers)
        b["source"] = P.TokenBuffer(torch.long, fill=-1)
        return b

    def score(self, view):
        bias, self.bias = self.bias, 0.0
        try:
            lasting = super().score(view)  # carried (decay) scores, no bias
        finally:
            self.bias = bias
        now = view.window_attention
        tiny = 1e-30
        newest = view.seen.amax(dim=-1, keepdim=True)
        age = (newest - view.seen).to(now.dtype)
        biased = now / now.mean(dim=-1, keepdim=True).clamp_min(tiny) - bias * age / float(view.budget)
        frame = (view.buffers["source"] >= 0) | (view.seen < 41)  # the system prompt too
        return torch.where(frame, lasting / lasting.mean(dim=-1, keepdim=True).clamp_min(tiny), biased)


P.POLICIES["kinds2"] = Kinds
from infmllm_ros.bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
