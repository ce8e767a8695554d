"""Would SmolLM2 read a far line better if it sat nearer the question in RoPE positions? (a diagnostic
script, not in the package; docs/benchmarks.md section 11e).

Streams exactly what ``infmllm-bench sceneqa`` streams. At every question, on a snapshot, each KV head's
rows older than its newest ``R`` held rows have their positions grouped toward that boundary by a factor
``C`` (a row ``d`` positions before the boundary moves to ``ceil(d / C)`` before it; the newest ``R`` rows,
the question and the answer keep their exact positions), the keys re-rotated to match
(``engine.rope.rerotate``); then the question is asked and scored as the bench scores it (a tie counts as
right), and the snapshot is restored, so the stream and the evictions are the bench's own. ``C = 1``
changes nothing. Before grouping, the cache's eviction gaps are closed (``make_room``, as the stream does
when positions run out), for every ``C``, so the question's own step never compacts, which would reset
the positions to row indices and undo the grouping (``room`` in each row: positions left before a
compaction; an earlier draft without this step left some questions ungrouped). So ``C = 1`` is the bench's
cache with its gaps closed, the baseline of the grouped runs. The grouping follows SelfExtend's neighbour / grouped positions (Jin et al., ICML 2024,
arXiv 2401.01325), here applied once to the stored keys rather than as a second attention pass.

    python grouped_positions_probe.py 1024 "infmllm[bias_frames=false,decay=0.97,keep_latest_per_camera=true]" 1 256 4 out.json
"""
import json
import sys
import time

import torch

from infmllm_ros.bench import sceneqa as S
from infmllm_ros.bench.common import get_model, load_config, variants
from infmllm_ros.engine import Chunk, Stream
from infmllm_ros.engine.rope import rerotate

budget, policy, bias = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
neighbours, group, out = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
if neighbours < 1 or group < 1:
    sys.exit("R must be >= 1 and C >= 1")
torch.set_num_threads(1)
cfg = load_config("sceneqa", {"minutes": 4.0, "budgets": [budget], "policies": [policy], "biases": [bias],
                              "out": "docs/bench_results/sceneqa"}, quick=False)
lm = get_model(cfg, None)
lines, _ = S.build_lines(cfg)
questions = S.make_questions(cfg, lines)
(variant,) = variants(cfg, budget)
tokens = S.question_tokens(lm.tokenizer, questions)
period = int(round(cfg.scene_period_s * cfg.fps))
if period < 1:
    sys.exit("this script follows the bench's SceneDescription cadence: scene_period_s * fps must be >= 1")
last_of_sample = {line.sample: line.index for line in lines}
stream = Stream(lm, variant.stream_config(cfg))
if stream.cache.rope.components != 1:
    sys.exit("1-D RoPE only (a multimodal RoPE's three components would each need grouping)")
inv_freq = stream.cache.rope.inv_freq


@torch.inference_mode()
def close_gaps() -> None:
    stream.cache.make_room(stream.cache.budget + stream.cache.max_chunk)


@torch.inference_mode()
def group_old_positions() -> None:
    for layer in stream.cache.layers:
        if not layer.is_initialized or layer.held("positions").shape[-2] <= neighbours:
            continue
        positions = layer.held("positions")  # [1, kv_heads, rows, 1]
        p = positions[..., 0].to(torch.long)
        boundary = p[..., -neighbours:][..., :1]
        grouped = boundary - torch.ceil((boundary - p).to(torch.float64) / group).to(torch.long)
        delta = torch.where(p < boundary, grouped, p) - p
        keys = layer.held("keys")
        keys.copy_(rerotate(keys, delta, inv_freq))
        positions.add_(delta.unsqueeze(-1).to(positions.dtype))


rows, qi, t0 = [], 0, time.time()
for line in lines:
    ids = lm.tokenizer(line.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stream.append_chunk(Chunk(input_ids=ids, kind="frame", camera=line.camera, stamp=line.stamp, text=line.text))
    if (line.sample + 1) % period == 0 and last_of_sample[line.sample] == line.index:
        stream.ask(cfg.scene_prompt, max_new_tokens=cfg.scene_tokens)
    while qi < len(questions) and questions[qi].after == line.index:
        q = questions[qi]
        qi += 1
        saved = stream.snapshot()
        # Close the eviction gaps first, for every C (C = 1 included), so that the question's own step does
        # not compact the cache (which resets every position to its row index and would undo the grouping).
        close_gaps()
        if group != 1:
            group_old_positions()
        if qi == 1:
            print("first question grouped", flush=True)
        room = stream.cache.budget + stream.cache.max_chunk - stream.cache.next_position
        answer = stream.ask(q.text, camera=q.camera, answer_prefix=q.cue, return_first_logits=True, max_new_tokens=1)
        stream.restore(saved)
        logp = torch.log_softmax(answer.first_logits.float(), dim=-1)
        sc = {w: float(logp[t]) for w, t in tokens[(q.kind, bool(q.cue))].items()}
        rows.append(dict(lag=q.lag_s, bucket=q.bucket, ok=sc[q.right] == max(sc.values()), pred=max(sc, key=sc.get),
                         right=q.right, room=room, asked=len(lm.tokenizer(q.text)["input_ids"])))
stream.close()
json.dump(dict(budget=budget, policy=policy, bias=bias, R=neighbours, C=group, rows=rows,
               seconds=round(time.time() - t0)), open(out, "w"))
by_lag = [sum(r["ok"] for r in rows if r["bucket"] == b) for b in sorted({r["bucket"] for r in rows})]
print(policy, budget, bias, "R", neighbours, "C", group, "right", sum(r["ok"] for r in rows), "of", len(rows),
      "by lag", by_lag)
