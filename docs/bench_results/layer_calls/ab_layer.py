"""The direct decode step with and without its C++ layer calls, in one process (docs/benchmarks.md section 12g).

    python docs/bench_results/layer_calls/ab_layer.py [threads]

SmolLM2-135M int4 (the GGUF's Q4_1 blocks), Inf-MLLM at budget 1024 filled with 1100 tokens of a novel;
rounds of 24 greedy decode steps from one snapshot, alternating between the Python walk of each layer
(``step.joined = []``) and the two C++ calls per layer (csrc/decode_layer.cpp). Prints each round's
fastest / median / mean step (CPU time of this thread at one thread, wall time at two), whether the
logits are bit for bit those of the first Python round, and the ratio of the medians of the round means.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "int4_q4_1"))
from ab_common import filled_stream, novel_ids  # noqa: E402

from infmllm_ros.engine import load_model  # noqa: E402

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
lm = load_model("smollm2", device="cpu", quantize="int4")
stream = filled_stream(lm, novel_ids(lm.tokenizer))
snapshot = stream.snapshot()
plans = stream._direct.joined
assert plans and all(plans), "the C++ layer calls are not in use here"


def decode_round(steps: int = 24):
    stream.restore(snapshot)
    stream.cache.decoding = True
    token, times, logits = 100, [], []
    for _ in range(steps):
        start = clock()
        out = stream._decode_one(token)
        times.append(clock() - start)
        token = int(out.argmax())
        logits.append(out)
    stream.cache.decoding = False
    times.sort()
    return times[0] * 1e3, times[steps // 2] * 1e3, sum(times) / steps * 1e3, logits


means = {"python": [], "joined": []}
reference = None
for round_ in range(8):
    name = "python" if round_ % 2 == 0 else "joined"
    stream._direct.joined = [] if name == "python" else plans
    fastest, median, mean, logits = decode_round()
    reference = reference or logits
    same = all(torch.equal(a, b) for a, b in zip(reference, logits))
    means[name].append(mean)
    print(f"{name:7s} fastest {fastest:.2f} median {median:.2f} mean {mean:.2f} ms"
          f" ({'same bits' if same else 'DIFFERENT'})", flush=True)
python, joined = statistics.median(means["python"]), statistics.median(means["joined"])
print(f"median of round means: python {python:.2f} ms, joined {joined:.2f} ms: {python / joined:.2f}x")
