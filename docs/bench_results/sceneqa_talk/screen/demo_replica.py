"""Replay the README demo's stream (frame lines, scene asks and questions, parsed from an infmllm-demo log) through
the engine with StreamConfig overrides (JSON), print the answers and, at the first question, the share of each
chunk the cache holds (f: frame, s: scene description). Screening only (docs/benchmarks.md section 11c):

    python demo_replica.py demo.log '{"bias_frames": true, "decay": 0.0}'
"""
import sys, json, importlib.util
from infmllm_ros.engine import load_model, Stream, StreamConfig
from infmllm_ros.engine.stream import Chunk

log, extra = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
plugin = extra.pop("_plugin", None)
if plugin:
    spec = importlib.util.spec_from_file_location("plug", plugin); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
SCENE = "In one sentence: how many people and which objects did the camera see most recently, and where?"
events = []
for line in open(log):
    if line.startswith("[frame] "):
        events.append(("frame", line[len("[frame] "):].rstrip("\n")))
    elif line.startswith("[scene "):
        events.append(("scene", None))
    elif line.startswith("[query] "):
        events.append(("query", line[len("[query] "):].strip()))
import torch; torch.set_num_threads(1)
lm = load_model("smollm2", device="cpu", dtype="float32", quantize="auto")
cfg = dict(policy="infmllm", budget_tokens=1024, max_chunk_tokens=256, sinks=4, recent=64, bias=1.0,
           keep_latest_per_camera=True)
cfg.update(extra)
s = Stream(lm, StreamConfig(**cfg))
# scene lines in the log come after the frames it saw; ask it where it appears
spans = []
first_query = True
for kind, text in events:
    if kind == "query" and first_query:
        first_query = False
        print("HELD", " ".join(f"{k[0]}{s.held_fraction(a, b):.2f}" for k, a, b in spans))
    before = s.cache.tokens_seen
    if kind == "frame":
        ids = lm.tokenizer(text + "\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
        s.append_chunk(Chunk(input_ids=ids, kind="frame", camera="front", text=text))
    elif kind == "scene":
        a = s.ask(SCENE, max_new_tokens=40)
        print("[scene]", a.text)
    else:
        a = s.ask(text, max_new_tokens=64)
        print("[query]", text, "->", a.text)
    spans.append((kind, before, s.cache.tokens_seen))
print("held", s.cache.tokens_held, "seen", s.cache.tokens_seen)
