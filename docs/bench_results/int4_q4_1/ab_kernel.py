"""A/B of the two int4 kernels (docs/benchmarks.md section 12e): the same stream decoded by two copies of
SmolLM2-135M, one with the q4_1 kernels (Q4_1 decoder Linears, Q8_0 LM head), one with torch's int4
kernel (and the float16 LM head), alternating in one process.

    python docs/bench_results/int4_q4_1/ab_kernel.py 1   # threads

Inf-MLLM at budget 1024 with 1096 tokens held (a novel from the shared data), direct decode step on
both; 12 rounds of 24 greedy tokens from the same snapshot, the order swapped every round.
Prints per-step times (min, p25, median), per-round tok/s, the median per-round ratio, and whether both
kernels chose the same tokens.
"""
import copy
import glob
import json
import os
import statistics
import sys
import time

import torch

from infmllm_ros.engine import Chunk, LoadedModel, Stream, StreamConfig, load_model
from infmllm_ros.engine.int4 import quantize_int4

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
base = load_model("smollm2", device="cpu", quantize="none")
data = os.environ.get("INFMLLM_SHARED_DATA", "/work/shared/data")
text = open(sorted(glob.glob(f"{data}/**/*.txt", recursive=True))[0]).read()[:30000]
ids = base.tokenizer(text, return_tensors="pt")["input_ids"][:, :1100]
streams, snaps = {}, {}
for kernel in ("torch", "q4_1"):
    model = copy.deepcopy(base.model)
    quantize_int4(model, kernel=kernel)
    print(kernel, type(model.lm_head).__name__, flush=True)
    lm = LoadedModel(model=model, tokenizer=base.tokenizer, name=base.name, quantize="int4")
    st = Stream(lm, StreamConfig(policy="infmllm", budget_tokens=1024))
    for i in range(0, ids.shape[1], 256):
        st.append_chunk(Chunk(input_ids=ids[:, i:i + 256], kind="text"))
    assert st.decode_path == "direct", st.decode_path
    streams[kernel], snaps[kernel] = st, st.snapshot()
rates = {k: [] for k in streams}
steps = {k: [] for k in streams}
tokens = {}
for rnd in range(12):
    for kernel in (("torch", "q4_1") if rnd % 2 == 0 else ("q4_1", "torch")):
        st = streams[kernel]
        st.restore(snaps[kernel])
        st.cache.decoding = True
        token, out = 100, []
        start = time.perf_counter()
        for _ in range(24):
            t0 = time.perf_counter()
            logits = st._decode_one(token)
            steps[kernel].append(time.perf_counter() - t0)
            token = int(logits.argmax())
            out.append(token)
        rates[kernel].append(24 / (time.perf_counter() - start))
        tokens.setdefault(kernel, out)
        st.cache.decoding = False
ratios = [q / t for q, t in zip(rates["q4_1"], rates["torch"])]
summary = {k: {"min_ms": round(sorted(v)[0] * 1e3, 2), "p25_ms": round(sorted(v)[len(v) // 4] * 1e3, 2),
               "median_ms": round(sorted(v)[len(v) // 2] * 1e3, 2)} for k, v in steps.items()}
print(json.dumps({"threads": threads, "per_step": summary,
                  "tok_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                  "q4_1/torch per-round median": round(statistics.median(ratios), 3),
                  "same tokens": tokens["q4_1"] == tokens["torch"], "tokens_q4_1": tokens["q4_1"],
                  "tokens_torch": tokens["torch"]}, indent=1))
