"""sdpa of one decode query over a SmolLM2-135M layer's KV cache (9 query heads, 3 KV heads, 64 dims) in float32,
bfloat16 and float16, one thread: whether a half-precision KV cache would speed up decode on this CPU
(docs/benchmarks.md section 12c).

    python docs/bench_results/sdpa_dtype/sdpa_dtype.py
"""
import torch, time
import torch.nn.functional as F
torch.set_num_threads(1)
for n in (1096, 2144):
    q32 = torch.randn(1, 9, 1, 64)
    k32 = torch.randn(1, 3, n, 64); v32 = torch.randn(1, 3, n, 64)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = q32.to(dt), k32.to(dt), v32.to(dt)
        for _ in range(20):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        best = 1e9
        for r in range(5):
            t = time.perf_counter()
            for _ in range(200):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            best = min(best, (time.perf_counter() - t) / 200)
        # also: repeat_interleave path (what transformers sdpa does without enable_gqa)
        kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        best2 = 1e9
        for r in range(5):
            t = time.perf_counter()
            for _ in range(200):
                F.scaled_dot_product_attention(q, kk, vv)
            best2 = min(best2, (time.perf_counter() - t) / 200)
        print(n, dt, f"gqa {best*1e6:.0f} us, expanded {best2*1e6:.0f} us")
