"""A 256-token chunk on 1280 held tokens (budget 1024, SmolLM2 int4 model: prefill takes the float weights),
our Inf-MLLM stream against plain transformers on the float weights, alternating in one process (usage:
python pf.py THREADS [prof]); ratio = their time / ours (>1: ours faster)."""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "int4_q4_1"))
from ab_common import novel_ids
from infmllm_ros.engine import load_model, Stream, StreamConfig, Chunk
from infmllm_ros.bench.peers import TransformersReference
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
lm = load_model("smollm2", device="cpu", quantize="int4")
ids = novel_ids(lm.tokenizer, 1280 + 256)
stream = Stream(lm, StreamConfig(policy="infmllm", budget_tokens=1024))
for i in range(0, 1280, 256): stream.append_chunk(Chunk(input_ids=ids[:, i:i+256], kind="text"))
snap = stream.snapshot()
ref = TransformersReference(lm, float_weights=True)
ref.prefill(ids[:, :1024], 256, 1024)
def ours():
    stream.restore(snap)
    t = time.perf_counter(); stream.append_chunk(Chunk(input_ids=ids[:, 1280:1536], kind="text")); return time.perf_counter() - t
def theirs():
    ref._cut(1024)
    return ref.prefill(ids[:, 1280:1536], 256, 1024)
a, b = [], []
for r in range(6):
    a.append(ours()); b.append(theirs())
print("ours ms", [round(x*1e3,1) for x in a]); print("ref ms", [round(x*1e3,1) for x in b])
print("ratio of mins (ref/ours = our speed ratio)", min(b)/min(a), "median", sorted(y/x for x,y in zip(a,b))[3])
if "prof" in sys.argv:
    stream.restore(snap)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        stream.append_chunk(Chunk(input_ids=ids[:, 1280:1536], kind="text"))
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    ref._cut(1024)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        ref.prefill(ids[:, 1280:1536], 256, 1024)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
