"""A/B of the direct decode step before (75630c5) and after f406c08, alternating in one process (docs section 12d).

Needs the step before as a module beside the new one:
    git show 75630c5:infmllm_ros/engine/decode.py > infmllm_ros/engine/_old_decode.py
    python docs/bench_results/direct_step_inline/ab_direct.py 1   # threads; then remove _old_decode.py
Prints per-step times (min, p25, median over 12 rounds x 24 greedy tokens each) and per-round tok/s.
"""
import glob, time, statistics, json, sys, torch
from infmllm_ros.engine import load_model, Stream, StreamConfig, Chunk
from infmllm_ros.engine.decode import DirectDecodeStep as New
from infmllm_ros.engine._old_decode import DirectDecodeStep as Old
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
lm = load_model("smollm2", device="cpu", quantize="int4")
src = sorted(glob.glob("/work/shared/data/**/*.txt", recursive=True))[0]
ids = lm.tokenizer(open(src).read()[:30000], return_tensors="pt")["input_ids"][:, :1100]
st = Stream(lm, StreamConfig(policy="infmllm", budget_tokens=1024))
for i in range(0, 1100, 256):
    st.append_chunk(Chunk(input_ids=ids[:, i:i+256], kind="text"))
new, old = New(lm.model), Old(lm.model)
print("fused_rope", new.fused_rope, "inline_norms", new.inline_norms, "path", st.decode_path)
snap = st.snapshot()
res = {"old": [], "new": []}
tokens = {}
steps = {"old": [], "new": []}
for rnd in range(12):
    for name, step in (("old", old), ("new", new)) if rnd % 2 == 0 else (("new", new), ("old", old)):
        st.restore(snap)
        st._direct = step
        st.cache.decoding = True
        t = 100; out = []
        s = time.perf_counter()
        for k in range(24):
            s1 = time.perf_counter()
            logits = st._decode_one(t)
            steps[name].append(time.perf_counter() - s1)
            t = int(logits.argmax()); out.append(t)
        res[name].append(24 / (time.perf_counter() - s))
        tokens.setdefault(name, out)
        st.cache.decoding = False
print("same tokens:", tokens["old"] == tokens["new"])
ratios = [n / o for n, o in zip(res["new"], res["old"])]
q = {n: sorted(v) for n, v in steps.items()}
print({n: {"min_ms": round(v[0] * 1e3, 2), "p25_ms": round(v[len(v) // 4] * 1e3, 2), "median_ms": round(v[len(v) // 2] * 1e3, 2)} for n, v in q.items()})
print(json.dumps({"threads": threads, "old_tok_s": [round(x, 2) for x in res["old"]], "new_tok_s": [round(x, 2) for x in res["new"]],
                  "new/old median": round(statistics.median(ratios), 3)}))
