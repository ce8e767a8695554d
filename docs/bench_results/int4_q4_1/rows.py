"""Where the q4_1 kernel pays against float32 and torch's int4 kernel, by rows (docs/benchmarks.md 12e).

    python docs/bench_results/int4_q4_1/rows.py 1   # threads

All 210 decoder Linear shapes of SmolLM2-135M (random Q4_1 blocks), cycled so that the weights stream from
memory as in a decode step; best of 5 passes; prints ms per pass and the float32 / q4_1, torch / q4_1 ratios.
"""
import sys
import time

import torch

from infmllm_ros.engine.int4 import Int4Linear

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
torch.manual_seed(0)
shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30  # (in, out)
layers = []
for fan_in, fan_out in shapes:
    linear = torch.nn.Linear(fan_in, fan_out, bias=False)
    layers.append((linear, Int4Linear(linear, "q4_1"), Int4Linear(linear, "torch")))


def best(fn, rows):
    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for (fan_in, _), layer in zip(shapes, layers):
            fn(layer, xs[fan_in])
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


calls = {
    "float32": lambda layer, x: torch.nn.functional.linear(x, layer[0].weight),
    "q4_1": lambda layer, x: layer[1]._product(layer[1]._rows(x), x),
    "torch": lambda layer, x: layer[2]._product(layer[2]._rows(x), x),
}
print(f"threads {torch.get_num_threads()}")
for rows in (1, 2, 4, 8, 16, 32):
    ms = {name: best(fn, rows) for name, fn in calls.items()}
    print(f"rows {rows:3d}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
          + f"; float32/q4_1 {ms['float32'] / ms['q4_1']:.2f}x, torch/q4_1 {ms['torch'] / ms['q4_1']:.2f}x")
