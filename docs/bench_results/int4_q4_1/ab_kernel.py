"""A/B of the two int4 kernels (docs/benchmarks.md section 12e): the same stream decoded by two copies of
SmolLM2-135M, one with the q4_1 kernels (Q4_1 decoder Linears, Q8_0 LM head), one with torch's int4
kernel (and the float16 LM head), alternating in one process.

    python docs/bench_results/int4_q4_1/ab_kernel.py 1   # threads

Inf-MLLM at budget 1024 with 1096 tokens held (a novel from the shared data), direct decode step on
both; 12 rounds of 24 greedy tokens from the same snapshot, the order swapped every round
(ab_common.alternate).
"""
import copy
import json
import sys

import torch

from ab_common import alternate, filled_stream, novel_ids
from infmllm_ros.engine import LoadedModel, load_model
from infmllm_ros.engine.int4 import quantize_int4

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
base = load_model("smollm2", device="cpu", quantize="none")
ids = novel_ids(base.tokenizer)
arms = {}
for kernel in ("torch", "q4_1"):
    model = copy.deepcopy(base.model)
    quantize_int4(model, kernel=kernel)
    print(kernel, type(model.lm_head).__name__, flush=True)
    stream = filled_stream(LoadedModel(model=model, tokenizer=base.tokenizer, name=base.name, quantize="int4"), ids)
    arms[kernel] = (stream, stream.snapshot(), lambda: None)
print(json.dumps(alternate(arms), indent=1))
