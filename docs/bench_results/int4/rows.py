"""float32 vs int4 matrix products over SmolLM2-135M's 210 decoder Linear shapes, by rows (tokens).

Why Int4Linear sends at most INT4_MAX_ROWS rows to the int4 kernel: per product, time for all 210
Linear layers of the decoder (q, k, v, o, gate, up, down x 30), weights on a random Q4_1 grid, cycled
so that they stream from memory as in a real forward pass.

    python docs/bench_results/int4/rows.py --threads 1
"""

import argparse
import time

import torch

from infmllm_ros.engine.int4 import GROUP_SIZE

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
floats, packed = [], []
for n, k in shapes:
    q = torch.randint(0, 16, (n, k))
    d, m = torch.rand(n, k // GROUP_SIZE) * 0.01, torch.randn(n, k // GROUP_SIZE) * 0.01
    floats.append((q.float().view(n, k // GROUP_SIZE, GROUP_SIZE) * d[..., None] + m[..., None]).view(n, k))
    packed.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                   torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().bfloat16()))


def timed(fn, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


print(f"threads {args.threads}, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
print("rows | float32 ms | int4 ms | float32/int4")
for rows in (1, 2, 4, 8, 16, 64, 256):
    x = {k: torch.randn(rows, k) for k in (576, 1536)}

    def run_float():
        for w in floats:
            torch.nn.functional.linear(x[w.shape[1]], w)

    def run_int4():
        for (p, sz), (_, k) in zip(packed, shapes):
            torch.ops.aten._weight_int4pack_mm_for_cpu(x[k].bfloat16(), p, GROUP_SIZE, sz).float()

    f, i = timed(run_float), timed(run_int4)
    print(f"{rows} | {f:.1f} | {i:.1f} | {f / i:.2f}x")
