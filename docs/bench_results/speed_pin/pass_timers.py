"""Milliseconds per decoded token spent in the cache's phases, keep_latest_per_camera off and on
(docs/benchmarks.md section 10c): timers wrapped around the cache's methods, 48 decoded tokens after
1,400 tokens of text streamed as 200-token frame chunks from three cameras, budget 1024, int4, one thread.

    python docs/bench_results/speed_pin/pass_timers.py
"""
import time, torch, collections
from infmllm_ros.engine import load_model, Stream, StreamConfig, Chunk
from infmllm_ros.engine import cache as C
torch.set_num_threads(1)
lm = load_model("smollm2", device="cpu", quantize="int4")
import glob, os
data = os.environ.get("INFMLLM_SHARED_DATA", "../shared/data")
src = sorted(glob.glob(f"{data}/**/*.txt", recursive=True))[0]
ids = lm.tokenizer(open(src).read()[:30000], return_tensors="pt")["input_ids"][:, :1400]
T = collections.Counter()
def wrap(cls, name):
    f = getattr(cls, name)
    def g(*a, **k):
        s = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - s; return r
    setattr(cls, name, g)
for n in ("apply", "select", "after_attention", "update"):
    wrap(C.CappedLayer, n)
if hasattr(C.CappedCache, "latest_pins"):
    wrap(C.CappedCache, "latest_pins")
else:
    wrap(C.CappedLayer, "_latest_of_each_source")
for policy in ("streamingllm", "h2o"):
    for pin in (False, True, False, True):
        st = Stream(lm, StreamConfig(policy=policy, budget_tokens=1024, keep_latest_per_camera=pin))
        for i in range(0, 1400, 200):
            st.append_chunk(Chunk(input_ids=ids[:, i:i+200], kind="frame", camera=f"cam{i%3}"))
        T.clear()
        s = time.perf_counter()
        for k in range(48):
            st._decode_one(100 + k)
        el = time.perf_counter() - s
        print(policy, "pin" if pin else "   ", f"{48/el:.2f} tok/s", {k: round(v/48*1e3, 2) for k, v in T.items()})
        st.close()
