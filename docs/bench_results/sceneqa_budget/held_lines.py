"""What the cache holds beside the asked line when a sceneqa question is answered (a diagnostic script,
not in the package; docs/benchmarks.md section 11d).

Streams exactly what ``infmllm-bench sceneqa`` streams (frame lines, the SceneDescription question every
20 s, questions as probes on a snapshot) and, at every question, counts over all layers and KV heads:
the asked line's held share, how many other lines of the asked camera and of the other cameras are held
whole (>= 90% of their tokens) and in line equivalents, and the conversation tokens held (system prompt,
scene descriptions, turn marks, and the question being asked with its answer cue, since the count is taken
after it arrived), beside whether the candidate ranking was right (the top-scored candidate; the bench
also counts a tie as right). One JSON row per question.

Added in the fifteenth session (docs/benchmarks.md section 11e): ``between``, the held rows (per layer and KV
head) that arrived after the asked line, i.e. how far back in the cache the model must read; ``pred`` and
``right``, the top-ranked and the true candidate; ``inst_eq`` / ``inst_held``, the other cameras' lines of
the asked line's own instant (same stamp) held, in line equivalents / at least half; ``pred_in_inst``,
``pred_in_any`` and ``right_in_any``, whether a line held at least half (of that instant / any but the asked
one) states the predicted / the true answer. ``by_distance.py`` reads the rows.

    python held_lines.py 512 "infmllm[bias_frames=false,decay=0.97,keep_latest_per_camera=true]" 1 out.json
"""
import json
import statistics
import sys
import time

import torch

from infmllm_ros.bench import sceneqa as S
from infmllm_ros.bench.common import get_model, load_config, variants
from infmllm_ros.engine import Chunk, Stream

budget, policy, bias, out = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
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
    sys.exit("held_lines.py follows the bench's SceneDescription cadence: scene_period_s * fps must be >= 1")
last_of_sample = {line.sample: line.index for line in lines}
stream = Stream(lm, variant.stream_config(cfg))
heads = len(stream.cache.layers) * stream.kv_heads
starts, ends, cams, rows, qi, t0 = [], [], [], [], 0, time.time()
for line in lines:
    ids = lm.tokenizer(line.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    starts.append(stream.cache.tokens_seen)
    ends.append(starts[-1] + ids.shape[1])
    cams.append(line.camera)
    stream.append_chunk(Chunk(input_ids=ids, kind="frame", camera=line.camera, stamp=line.stamp, text=line.text))
    if (line.sample + 1) % period == 0 and last_of_sample[line.sample] == line.index:
        stream.ask(cfg.scene_prompt, max_new_tokens=cfg.scene_tokens)
    while qi < len(questions) and questions[qi].after == line.index:
        q = questions[qi]
        qi += 1
        saved = stream.snapshot()
        answer = stream.ask(q.text, camera=q.camera, answer_prefix=q.cue, return_first_logits=True, max_new_tokens=1)
        seen = torch.cat([layer.seen.reshape(-1) for layer in stream.cache.layers if layer.is_initialized])
        stream.restore(saved)
        s, e = torch.tensor(starts), torch.tensor(ends)
        idx = torch.searchsorted(s, seen, right=True) - 1
        in_line = (idx >= 0) & (seen < e[idx.clamp(min=0)])
        share = torch.bincount(idx[in_line], minlength=len(starts)).float() / (heads * (e - s).float())
        same = torch.tensor([c == q.camera for c in cams]) & (torch.arange(len(starts)) != q.target)
        logp = torch.log_softmax(answer.first_logits.float(), dim=-1)
        sc = {w: float(logp[t]) for w, t in tokens[(q.kind, bool(q.cue))].items()}
        pred = max(sc, key=sc.get)
        fact = S.QUESTION_TYPES[q.kind].fact
        sample = torch.tensor([held.sample for held in lines[:len(starts)]])
        instant = (sample == lines[q.target].sample) & (torch.arange(len(starts)) != q.target)
        held_instant = torch.nonzero(instant & (share >= 0.5)).flatten().tolist()
        held_other = [i for i in torch.nonzero(share >= 0.5).flatten().tolist() if i != q.target]
        rows.append(dict(between=float((seen >= int(e[q.target])).sum()) / heads, pred=pred, right=q.right,
                         kind=q.kind, inst_eq=float(share[instant].sum()), inst_held=len(held_instant),
                         pred_in_inst=any(lines[i].facts.get(fact) == pred for i in held_instant),
                         pred_in_any=any(lines[i].facts.get(fact) == pred for i in held_other),
                         right_in_any=any(lines[i].facts.get(fact) == q.right for i in held_other),
                         lag=q.lag_s, bucket=q.bucket, ok=pred == q.right,
                         target=float(share[q.target]),
                         same_whole=int((share[same] >= 0.9).sum()), same_eq=float(share[same].sum()),
                         other_whole=int((share[~same] >= 0.9).sum()) - int(share[q.target] >= 0.9),
                         other_eq=float(share[~same].sum()) - float(share[q.target]),
                         talk=float((~in_line).sum()) / heads, held=float(seen.numel()) / heads))
stream.close()
json.dump(dict(budget=budget, policy=policy, bias=bias, rows=rows, seconds=round(time.time() - t0)), open(out, "w"))
keys = ["between", "inst_eq", "inst_held", "pred_in_inst", "target", "same_whole", "same_eq", "other_whole", "other_eq", "talk", "held"]
print(policy, budget, bias, "right", sum(r["ok"] for r in rows), "of", len(rows))
for name, part in (("all", rows), ("right", [r for r in rows if r["ok"]]), ("wrong", [r for r in rows if not r["ok"]])):
    if part:
        print(name, len(part), {k: round(statistics.mean(r[k] for r in part), 2) for k in keys})
