"""Our Q4_1 product's throughput against the machine's read bandwidth (docs/benchmarks.md section 12i).

    python docs/bench_results/decode_step/q4_1_throughput.py

One thread. A float32 sum over 66 MB (what reading memory costs), then SmolLM2-135M's 30 layers of q4_1
blocks (q/k/v joined, o, gate/up joined, down: 66.4 MB, random nibbles, fp16 scales) multiplied by one
activation row each, and two matrices alone, repeated while they stay in the caches. Prints each median
time and the bytes of blocks read per second: a product far below the sum's rate, even from the caches,
is bound by its instructions, not by memory.
"""
import time

import torch

from infmllm_ros.engine import kernels

assert kernels.cpu_kernels_status()[0], kernels.cpu_kernels_status()[1]
torch.set_num_threads(1)


def median_time(fn, n=20):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2]


def blocks(out, inputs):
    b = torch.randint(0, 256, (out, inputs // 32, 20), dtype=torch.uint8)
    b[..., 0:4] = torch.tensor([0, 0x20, 0, 0x20], dtype=torch.uint8)  # d = m = 0.0078125 (fp16)
    return b


a = torch.randn(66 * 1024 * 1024 // 4)
s = median_time(lambda: a.sum())
print(f"float32 sum of 66 MB: {s * 1e3:.1f} ms, {a.numel() * 4 / 1e9 / s:.1f} GB/s")
layers = [(blocks(out, width), width) for _ in range(30) for out, width in ((960, 576), (576, 576), (3072, 576),
                                                                          (576, 1536))]
rows = {width: torch.randn(1, width) for width in (576, 1536)}
op = torch.ops.infmllm.q4_1_matmul.default
total = sum(b.numel() for b, _ in layers)
s = median_time(lambda: [op(rows[width], b) for b, width in layers], 10)
print(f"q4_1, 30 layers: {s * 1e3:.1f} ms for {total / 1e6:.1f} MB of blocks, {total / 1e9 / s:.1f} GB/s")
for name, (b, width) in (("gate/up", layers[2]), ("o", layers[1])):
    s = median_time(lambda: op(rows[width], b), 200)
    print(f"q4_1, {name} alone, repeated: {s * 1e3:.3f} ms for {b.numel() / 1e6:.2f} MB, {b.numel() / 1e9 / s:.1f} GB/s")
