"""Screening script (docs/benchmarks.md section 11c): the 11b rule with the age counted in conversation tokens
(frames do not age anything). talka: frames aged on that clock too (what became InfMLLM.bias_frames=False);
talkb: frames not aged (11b's frames with the new clock for the conversation). Registers both, then runs the CLI:

    python talk_policy.py sceneqa --minutes 4 --budget 512 --policy "talkb[bias=1,bias_frames=false,decay=0.97,keep_latest_per_camera=true]" --threads 1 --json

(The bias goes inside the brackets: --bias makes variants of the policy named infmllm only; a first screen run
with --bias 1 ran both at bias 0, sceneqa_talk_clock_bias0.json.)
"""
from dataclasses import dataclass
from typing import ClassVar
import torch
from infmllm_ros.engine import policies as P


def conversation_clock(talk, frame, seen):
    """Assign each unassigned row (-1) the count of conversation tokens before it; rows sorted by seen."""
    conv = (~frame).to(torch.long)
    assigned = talk >= 0
    # base: after the newest assigned row (its talk plus 1 if it is conversation); 0 if none
    last_seen = torch.where(assigned, seen, torch.full_like(seen, -1)).amax(dim=-1, keepdim=True)
    is_last = assigned & (seen == last_seen)
    base = torch.where(is_last, talk + conv, torch.zeros_like(talk)).amax(dim=-1, keepdim=True)
    new = ~assigned
    before = torch.cumsum(conv * new, dim=-1) - conv * new  # exclusive, over the new rows only
    return torch.where(new, base + before, talk)


@dataclass
class Talk(P.InfMLLM):
    name: ClassVar[str] = "talka"
    AGE_FRAMES: ClassVar[bool] = True

    @property
    def token_buffers(self):
        b = dict(super().token_buffers)
        b["talk"] = P.TokenBuffer(torch.long, fill=-1)
        return b

    def score(self, view):
        frame = view.buffers[P.FRAME]
        talk = conversation_clock(view.buffers["talk"], frame, view.seen)
        view.updates["talk"] = talk
        look = view.window_attention
        carried = look + self.decay * view.buffers["carried"]
        view.updates["carried"] = carried
        age = (talk.amax(dim=-1, keepdim=True) - talk).to(look.dtype)
        penalty = self.bias * age / float(view.budget)
        conv = P._normalised(look) - penalty
        frames = P._normalised(carried) - (penalty if self.AGE_FRAMES else 0.0)
        return torch.where(frame, frames, conv)


@dataclass
class TalkB(Talk):
    name: ClassVar[str] = "talkb"
    AGE_FRAMES: ClassVar[bool] = False


P.POLICIES["talka"] = Talk
P.POLICIES["talkb"] = TalkB


if __name__ == "__main__":
    import sys

    from infmllm_ros.bench.cli import main

    sys.exit(main(sys.argv[1:]))
