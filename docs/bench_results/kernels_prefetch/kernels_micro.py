"""The CPU kernels alone on SmolLM2-135M's decode shapes (docs/benchmarks.md section 12f).

    python docs/bench_results/kernels_prefetch/kernels_micro.py [threads]

One token's int4 products (30 layers x q/k/v/o/gate/up/down, random Q4_1 blocks with fp16 d = m = 1) and
one token's decode attention (30 layers, 9 query / 3 KV heads, 1100 cached tokens, views into a larger
buffer), each twice: with a distinct tensor per layer (66 MB and 50 MB, past the 32 MB L3: read from
memory, as in a real step) and with the same few tensors over and over (from cache: the kernels'
compute). Prints the fastest of 7 (products) / 15 (attention) repetitions in CPU time of this thread.
To compare two versions of a kernel, run this on each (``git stash``), several times, alternating.
"""
import sys
import time

import torch

from infmllm_ros.engine import kernels

ok, why = kernels.cpu_kernels_status()
assert ok, why
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
g = torch.Generator().manual_seed(0)


def fastest(fn, repeats):
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
weights = []
for out, inputs in layer * 30:
    w = torch.randint(0, 256, (out, inputs // 32, 20), dtype=torch.uint8, generator=g)
    w[..., 0], w[..., 1], w[..., 2], w[..., 3] = 0, 0x3C, 0, 0x3C  # fp16 d = m = 1.0
    weights.append(w)
xs = {n: torch.randn(1, n, generator=g) for n in (576, 1536)}
q4_1 = torch.ops.infmllm.q4_1_matmul.default
megabytes = sum(w.numel() for w in weights) / 1e6
for name, ws in (("from memory", weights), ("from cache", weights[:7] * 30)):
    seconds = fastest(lambda: [q4_1(xs[w.shape[1] * 32], w) for w in ws], 7)
    print(f"int4 products, one token ({megabytes:.0f} MB), {name}: {seconds * 1e3:.2f} ms"
          + (f" ({megabytes / 1e3 / seconds:.1f} GB/s)" if name == "from memory" else ""))

attention = torch.ops.infmllm.decode_attention.default
keys = [torch.randn(1, 3, 1300, 64, generator=g)[:, :, :1100] for _ in range(30)]
values = [torch.randn(1, 3, 1300, 64, generator=g)[:, :, :1100] for _ in range(30)]
query = torch.randn(1, 9, 1, 64, generator=g)
for name, ks, vs in (("from memory", keys, values), ("from cache", keys[:1] * 30, values[:1] * 30)):
    seconds = fastest(lambda: [attention(query, k, v, 0.125) for k, v in zip(ks, vs)], 15)
    print(f"decode attention, one token (30 layers, 1100 tokens), {name}: {seconds * 1e3:.2f} ms")
