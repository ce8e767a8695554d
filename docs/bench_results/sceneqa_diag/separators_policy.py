"""A measured candidate that was not kept (docs/benchmarks.md section 10c): Inf-MLLM plus the newest
``SEPS`` newline tokens kept whatever they score (the separators of SepLLM, Chen et al., arXiv 2412.12094).

Token ids are recorded by a hook on the input embedding (a script, not the package's plumbing). It
registers the policy as ``infsep`` and runs the bench CLI:

    SEPS=64 python separators_policy.py sceneqa --minutes 4 --budget 512 \
        --policy "infsep[keep_latest_per_camera=true,bias=1]" --threads 1 --json
"""
import os
import sys
from dataclasses import dataclass
from typing import ClassVar
import torch
from infmllm_ros.engine import policies as P
from infmllm_ros.engine import cache as C

IDS = torch.full((400000,), -1, dtype=torch.long)
STATE = {"cache": None, "sep_ids": None}
_orig_begin = C.CappedCache.begin_step


def begin_step(self, positions, values=None, continues=False):
    STATE["cache"] = self
    return _orig_begin(self, positions, values, continues)


C.CappedCache.begin_step = begin_step
_orig_static = C.CappedCache.begin_static_step


def begin_static_step(self, step):
    STATE["cache"] = self
    return _orig_static(self, step)


C.CappedCache.begin_static_step = begin_static_step


def hook(module, args):
    ids = args[0].reshape(-1)
    start = STATE["cache"].tokens_seen
    IDS[start:start + ids.numel()] = ids


@dataclass
class InfSep(P.InfMLLM):
    name: ClassVar[str] = "infsep"
    seps: int = int(os.environ.get("SEPS", "64"))
    sepset: str = os.environ.get("SEPSET", "nl")

    def score(self, view):
        s = super().score(view)
        ids = IDS[view.seen.reshape(-1)].view_as(view.seen)
        sep = torch.isin(ids, STATE["sep_ids"][self.sepset])
        # newest first: rank among separators counted from the newest end
        rank = sep.flip(-1).long().cumsum(-1).flip(-1)
        boost = sep & (rank <= self.seps)
        return torch.where(boost, torch.full_like(s, 1e6) + view.seen.float() * 1e-3, s)


P.POLICIES["infsep"] = InfSep

from infmllm_ros.bench import common  # noqa: E402
_orig_get = common.get_model


def get_model(cfg, lm=None):
    lm = _orig_get(cfg, lm)
    if STATE["sep_ids"] is not None:
        return lm
    tok = lm.tokenizer
    nl = [i for t, i in tok.get_vocab().items() if "Ċ" in t and set(t) <= {"Ċ", "Ġ"}]
    punct = [tok.convert_tokens_to_ids(t) for t in (".", ",", ":", ";", "),", ");", "?", "!")]
    STATE["sep_ids"] = {"nl": torch.tensor(nl), "punct": torch.tensor(nl + [p for p in punct if p is not None])}
    print("separator ids:", STATE["sep_ids"]["nl"].tolist()[:10], file=sys.stderr)
    lm.model.get_input_embeddings().register_forward_pre_hook(hook)
    return lm


common.get_model = get_model
from infmllm_ros.bench import sceneqa as S  # noqa: E402
S.get_model = get_model
from infmllm_ros.bench import cli  # noqa: E402
cli.get_model = get_model
main = cli.main

sys.exit(main(sys.argv[1:]))
