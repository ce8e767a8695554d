"""A/B of the decode attention kernel (docs/benchmarks.md section 12e): one stream, its decoder's attention
switched between torch's sdpa and our kernel (``infmllm::decode_attention``) every round, in one process.

    python docs/bench_results/int4_q4_1/ab_attention.py 1   # threads

SmolLM2-135M with int4 weights (the q4_1 kernels), Inf-MLLM at budget 1024 with 1096 tokens held (a novel
from the shared data), direct decode step; 12 rounds of 24 greedy tokens from the same snapshot, the
order swapped every round (ab_common.alternate).
"""
import json
import sys

import torch

from ab_common import alternate, filled_stream, novel_ids
from infmllm_ros.engine import load_model

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
lm = load_model("smollm2", device="cpu", quantize="int4")
stream = filled_stream(lm, novel_ids(lm.tokenizer))
modules = [layer.self_attn for layer in lm.model.model.layers]
kernel = {m: m._infmllm_base for m in modules}
assert all(hasattr(f, "base") for f in kernel.values()), "the decode attention kernel is not installed"


def use(with_kernel: bool):
    def before():
        for m in modules:
            m._infmllm_base = kernel[m] if with_kernel else kernel[m].base
    return before


snapshot = stream.snapshot()
result = alternate({"sdpa": (stream, snapshot, use(False)), "kernel": (stream, snapshot, use(True))})
use(True)()
print(json.dumps(result, indent=1))
