"""Wall time per 256-token chunk of the cache sections (scoring, select, apply, compaction) for one policy
(usage: python brk.py infmllm|streamingllm|h2o); budget 1024, SmolLM2 int4 model, one thread."""
import sys, time, torch, functools
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "int4_q4_1"))
from ab_common import novel_ids
from infmllm_ros.engine import load_model, Stream, StreamConfig, Chunk
import infmllm_ros.engine.cache as C
torch.set_num_threads(1)
lm = load_model("smollm2", device="cpu", quantize="int4")
ids = novel_ids(lm.tokenizer, 1280 + 512)
acc = {}
clk = time.perf_counter
def wrap(cls, name):
    f = getattr(cls, name)
    @functools.wraps(f)
    def g(*a, **k):
        t = clk(); r = f(*a, **k); acc[name] = acc.get(name, 0) + clk() - t; return r
    setattr(cls, name, g)
for n in ("after_attention", "select", "apply", "compact"):
    wrap(C.CappedLayer, n)
wrap(C.CappedCache, "make_room"); wrap(C.CappedCache, "end_step"); wrap(C.CappedCache, "latest_pins")
pol = sys.argv[1] if len(sys.argv) > 1 else "infmllm"
stream = Stream(lm, StreamConfig(policy=pol, budget_tokens=1024))
for i in range(0, 1280, 256): stream.append_chunk(Chunk(input_ids=ids[:, i:i+256], kind="text"))
snap = stream.snapshot()
tot = 0
for r in range(4):
    for j in range(2):
        if j == 0: stream.restore(snap)
        t = clk(); stream.append_chunk(Chunk(input_ids=ids[:, 1280 + 256*j:1536 + 256*j], kind="text")); tot += clk() - t
print(pol, "per chunk ms: total %.0f" % (tot / 8e-3), " ".join("%s %.1f" % (k, v / 8e-3) for k, v in acc.items()))
