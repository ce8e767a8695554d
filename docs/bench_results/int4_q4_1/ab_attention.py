"""A/B of the decode attention kernel (docs/benchmarks.md section 12e): one stream, its decoder's attention
switched between our kernel (``infmllm::decode_attention``) and torch's sdpa every round, in one process.

    python docs/bench_results/int4_q4_1/ab_attention.py 1   # threads

SmolLM2-135M with int4 weights (the q4_1 kernels), Inf-MLLM at budget 1024 with 1096 tokens held (a novel
from the shared data), direct decode step; 12 rounds of 24 greedy tokens from the same snapshot, the
order swapped every round. Prints per-step times (min, p25, median), per-round tok/s, the median
per-round ratio, and whether both chose the same tokens.
"""
import glob
import json
import os
import statistics
import sys
import time

import torch

from infmllm_ros.engine import Chunk, Stream, StreamConfig, load_model

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
lm = load_model("smollm2", device="cpu", quantize="int4")
data = os.environ.get("INFMLLM_SHARED_DATA", "/work/shared/data")
text = open(sorted(glob.glob(f"{data}/**/*.txt", recursive=True))[0]).read()[:30000]
ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :1100]
st = Stream(lm, StreamConfig(policy="infmllm", budget_tokens=1024))
for i in range(0, ids.shape[1], 256):
    st.append_chunk(Chunk(input_ids=ids[:, i:i + 256], kind="text"))
assert st.decode_path == "direct", st.decode_path
modules = [layer.self_attn for layer in lm.model.model.layers]
kernel = {m: m._infmllm_base for m in modules}
assert all(hasattr(f, "base") for f in kernel.values()), "the decode attention kernel is not installed"
snap = st.snapshot()
rates = {"sdpa": [], "kernel": []}
steps = {"sdpa": [], "kernel": []}
tokens = {}
for rnd in range(12):
    for name in (("sdpa", "kernel") if rnd % 2 == 0 else ("kernel", "sdpa")):
        for m in modules:
            m._infmllm_base = kernel[m] if name == "kernel" else kernel[m].base
        st.restore(snap)
        st.cache.decoding = True
        token, out = 100, []
        start = time.perf_counter()
        for _ in range(24):
            t0 = time.perf_counter()
            logits = st._decode_one(token)
            steps[name].append(time.perf_counter() - t0)
            token = int(logits.argmax())
            out.append(token)
        rates[name].append(24 / (time.perf_counter() - start))
        tokens.setdefault(name, out)
        st.cache.decoding = False
for m in modules:
    m._infmllm_base = kernel[m]
ratios = [k / s for k, s in zip(rates["kernel"], rates["sdpa"])]
summary = {k: {"min_ms": round(sorted(v)[0] * 1e3, 2), "p25_ms": round(sorted(v)[len(v) // 4] * 1e3, 2),
               "median_ms": round(sorted(v)[len(v) // 2] * 1e3, 2)} for k, v in steps.items()}
print(json.dumps({"threads": threads, "per_step": summary,
                  "tok_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                  "kernel/sdpa per-round median": round(statistics.median(ratios), 3),
                  "same tokens": tokens["kernel"] == tokens["sdpa"], "tokens": tokens}, indent=1))
