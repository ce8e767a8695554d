"""The decode step's time in one process of one source tree (docs/benchmarks.md section 12i).

    python docs/bench_results/decode_step/step_time.py THREADS TREE LABEL

SmolLM2-135M int4, Inf-MLLM at budget 1024 filled with a novel (as ab_layer.py in layer_calls/); six rounds
of 24 greedy decode steps from one snapshot (the first a warm-up); prints the median of the rounds' mean
step (CPU time of the thread at one thread, wall time at two) and the last token. TREE is the source
tree the engine must come from (a check that PYTHONPATH picked it): run two trees' processes in turn, each
with its own TORCH_EXTENSIONS_DIR, to compare builds whose kernels cannot share a process.
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, sys.argv[2] + "/docs/bench_results/int4_q4_1")
from ab_common import filled_stream, novel_ids  # noqa: E402

import infmllm_ros.engine as engine  # noqa: E402
from infmllm_ros.engine import load_model  # noqa: E402

assert engine.__file__.startswith(sys.argv[2]), engine.__file__
torch.set_num_threads(int(sys.argv[1]))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
lm = load_model("smollm2", device="cpu", quantize="int4")
stream = filled_stream(lm, novel_ids(lm.tokenizer))
snapshot = stream.snapshot()
assert all(stream._direct.joined), "the C++ layer calls are not in use here"


def decode_round(steps=24):
    stream.restore(snapshot)
    stream.cache.decoding = True
    token, times = 100, []
    for _ in range(steps):
        start = clock()
        token = int(stream._decode_one(token).argmax())
        times.append(clock() - start)
    stream.cache.decoding = False
    return sum(times) / steps * 1e3, token


decode_round()
rounds = [decode_round() for _ in range(5)]
print(f"{sys.argv[3]}: median round mean {statistics.median(m for m, _ in rounds):.2f} ms, last token {rounds[0][1]}")
