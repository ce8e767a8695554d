"""Before/after record for issue #14 (kept with its results; not part of the package).

Runs, interleaved in one process on one model load: the engine of commit 73bdab2 ("old": DynamicLayer
caches, torch.cat per step), this branch's static cache ("new"), this branch with int8 weights ("q8"),
and plain transformers (DynamicCache), per policy: chunked prefill tok/s and greedy decode tok/s; ratios
are medians of per-round ratios. The old engine is imported from a copy:

    git archive 73bdab2 infmllm_ros/engine | tar -x -C /tmp/eng/oldpkg
    mv /tmp/eng/oldpkg/infmllm_ros/engine /tmp/eng/oldpkg/old_engine
    sed -i 's/_PREFIX = "infmllm_"/_PREFIX = "oldinf_"/' /tmp/eng/oldpkg/old_engine/attention.py

and the script is exec'd with ``lm`` (the loaded SmolLM2) in scope; CMP_THREADS, CMP_BUDGET,
CMP_POLICIES, CMP_ROUNDS choose the run.
"""
import sys, time, copy, statistics, torch, os
sys.path.insert(0, "/tmp/eng/oldpkg")
import old_engine
from infmllm_ros.engine import Stream, StreamConfig, Chunk, LoadedModel
from infmllm_ros.bench.common import text_token_ids
from infmllm_ros.bench.speed import PlainTransformers
THREADS = int(os.environ.get("CMP_THREADS", "1")); torch.set_num_threads(THREADS)
BUDGET, CHUNK, TOKENS, DEC, ROUNDS = int(os.environ.get("CMP_BUDGET", 1024)), 256, 512, 24, int(os.environ.get("CMP_ROUNDS", 3))
POLICIES = os.environ.get("CMP_POLICIES", "infmllm,h2o,streamingllm,full").split(",")
old_lm = old_engine.LoadedModel(model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer, name=lm.name)
old_lm.model.config._attn_implementation_internal = "sdpa"
from infmllm_ros.engine.models import quantize_model
q8_lm = LoadedModel(model=quantize_model(copy.deepcopy(old_lm.model), "int8"), tokenizer=lm.tokenizer, name=lm.name, quantize="int8")
fill = BUDGET + CHUNK
ids = text_token_ids(lm, "text/pg158-emma.txt", fill + ROUNDS * TOKENS + 10)
def mk(kind, policy):
    if kind == "q8":
        s = Stream(q8_lm, StreamConfig(policy=policy, budget_tokens=BUDGET, max_chunk_tokens=CHUNK))
    elif kind == "old":
        s = old_engine.Stream(old_lm, old_engine.StreamConfig(policy=policy, budget_tokens=BUDGET, max_chunk_tokens=CHUNK))
    else:
        s = Stream(lm, StreamConfig(policy=policy, budget_tokens=0 if policy == "full" else BUDGET, max_chunk_tokens=CHUNK))
    s._started = s._in_user_turn = True
    return s
def prefill(s, block, mod):
    t = time.perf_counter()
    for i in range(0, block.shape[1], CHUNK):
        s.append_chunk(mod.Chunk(input_ids=block[:, i:i+CHUNK]))
    return block.shape[1] / (time.perf_counter() - t)
def decode(s, kind, mod):
    first = torch.tensor([[lm.tokenizer.encode(" The")[0]]])
    if kind == "old":
        logits = s.append_chunk(mod.Chunk(input_ids=first), return_logits=True).logits[-1]
        t = time.perf_counter()
        s.cache.decoding = True
        for _ in range(DEC):
            tok = int(logits.argmax())
            logits = s.append_chunk(mod.Chunk(input_ids=torch.tensor([[tok]]), kind="answer"), return_logits=True).logits[-1]
        s.cache.decoding = False
    else:
        logits = s.append_chunk(Chunk(input_ids=first), return_logits="last").logits[-1]
        t = time.perf_counter()
        s.generate(logits, DEC, repetition_penalty=1.0, stop_at_eos=False)
    return DEC / (time.perf_counter() - t)
variants = [(k, p) for p in POLICIES for k in ("old", "new")] + [("q8", p) for p in POLICIES if p in ("infmllm", "h2o")] + [("plain", "transformers")]
streams, res = {}, {v: {"prefill": [], "decode": []} for v in variants}
for v in variants:
    k, p = v
    if k == "plain":
        streams[v] = PlainTransformers(lm, ids[:, :fill], CHUNK)
    else:
        streams[v] = mk(k, p); prefill(streams[v], ids[:, :fill], old_engine if k == "old" else sys.modules["infmllm_ros.engine"])
print("filled", flush=True)
for r in range(ROUNDS):
    block = ids[:, fill + r * TOKENS: fill + (r + 1) * TOKENS]
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
        k, p = v
        s = streams[v]
        if k == "plain":
            res[v]["prefill"].append(block.shape[1] / s.prefill(block))
            res[v]["decode"].append(DEC / s.decode(lm.tokenizer.encode(" The")[0], DEC))
        else:
            mod = old_engine if k == "old" else sys.modules["infmllm_ros.engine"]
            res[v]["prefill"].append(prefill(s, block, mod))
            res[v]["decode"].append(decode(s, k, mod))
    print("round", r, flush=True)
plain = res[("plain", "transformers")]
import datetime; print(datetime.datetime.utcnow().isoformat(), f"threads={THREADS} budget={BUDGET} chunk={CHUNK} prefill/round={TOKENS} decode={DEC} rounds={ROUNDS}")
for v in variants:
    m = {x: statistics.median(y) for x, y in res[v].items()}
    line = f"{v[0]:5s} {v[1]:13s} prefill {m['prefill']:7.1f} tok/s  decode {m['decode']:6.2f} tok/s"
    line += f" | vs plain: prefill {statistics.median(a/b for a,b in zip(res[v]['prefill'], plain['prefill'])):.2f} decode {statistics.median(a/b for a,b in zip(res[v]['decode'], plain['decode'])):.2f}"
    if v[0] in ("new", "q8"):
        o = res[("old", v[1])]
        line += f" | new/old: prefill {statistics.median(a/b for a,b in zip(res[v]['prefill'], o['prefill'])):.2f} decode {statistics.median(a/b for a,b in zip(res[v]['decode'], o['decode'])):.2f}"
    print(line, flush=True)
for s in streams.values():
    if hasattr(s, "close"): s.close()
del old_lm, q8_lm
