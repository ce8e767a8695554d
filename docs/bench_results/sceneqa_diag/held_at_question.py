"""What each policy holds when a sceneqa question is answered (a diagnostic script, not in the package;
docs/benchmarks.md section 10c).

Streams the sceneqa lines as ``infmllm-bench sceneqa`` does and, at every question, counts over all
layers and KV heads the share held of the system prompt, of the asked line, of the other lines (whole
lines and line equivalents) and whether the candidate ranking was right. One JSON row per question.

    python held_at_question.py 512 "h2o[keep_latest_per_camera=true]" 0 diag_h2o_512.json
    python held_at_question.py 512 "infmllm[keep_latest_per_camera=true]" 1 diag_inf_512.json
"""
import json, sys, time
import torch
from infmllm_ros.bench.common import load_config, get_model, variants
from infmllm_ros.bench import sceneqa as S
from infmllm_ros.engine import Chunk, Stream

budget, pol, bias, out = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
minutes = float(sys.argv[5]) if len(sys.argv) > 5 else 4.0
torch.set_num_threads(1)
cfg = load_config("sceneqa", {"minutes": minutes, "budgets": [budget], "policies": [pol], "biases": [bias],
                              "out": "bench_results/sceneqa"}, quick=False)
lm = get_model(cfg, None)
lines, meta = S.build_lines(cfg)
questions = S.make_questions(cfg, lines)
(variant,) = variants(cfg, budget)
tokens = S.question_tokens(lm.tokenizer, questions)
stream = Stream(lm, variant.stream_config(cfg))
starts, cams, facts = [], [], []
rows = []
qi = 0
t0 = time.time()
for line in lines:
    ids = lm.tokenizer(line.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stream.append_chunk(Chunk(input_ids=ids, kind="frame", camera=line.camera, stamp=line.stamp, text=line.text))
    # the chunk's stream range: its last ids.shape[1] tokens (turn marks may precede it)
    end = stream.cache.tokens_seen
    starts.append((end - ids.shape[1], end))
    cams.append(line.camera)
    while qi < len(questions) and questions[qi].after == line.index:
        q = questions[qi]; qi += 1
        saved = stream.snapshot()
        ans = stream.ask(q.text, camera=q.camera, answer_prefix=q.cue, return_first_logits=True, max_new_tokens=1)
        # per-line held counts, all layers and heads together
        seen = torch.cat([l.seen.reshape(-1) for l in stream.cache.layers if l.is_initialized])
        b = torch.tensor([s for s, e in starts] + [starts[-1][1]])
        first = starts[0][0]
        idx = torch.searchsorted(b, seen, right=True) - 1
        denom = len(stream.cache.layers) * stream.kv_heads
        sys_share = float((seen < first).sum()) / (denom * first)
        inline = (idx >= 0) & (idx < len(starts))
        counts = torch.bincount(idx[inline], minlength=len(starts)).float()
        lens = torch.tensor([e - s for s, e in starts]).float()
        share = counts / (denom * lens)
        target = q.target
        same = [i for i in range(len(starts)) if cams[i] == q.camera and i != target]
        other = [i for i in range(len(starts)) if cams[i] != q.camera]
        gaps = float(((seen >= starts[-1][1])).sum()) / denom  # question/answer tokens held (per head avg)
        stream.restore(saved)
        logp = torch.log_softmax(ans.first_logits.float(), dim=-1)
        sc = {w: float(logp[t]) for w, t in tokens[(q.kind, bool(q.cue))].items()}
        rank = 1 + sum(1 for w, s in sc.items() if w != q.right and s > sc[q.right])
        rows.append(dict(lag=q.lag_s, bucket=q.bucket, ok=rank == 1, target=float(share[target]),
                         sys=sys_share, same_eq=float(share[same].sum()) if same else 0.0,
                         same_whole=int((share[same] > 0.9).sum()) if same else 0,
                         other_eq=float(share[other].sum()), other_whole=int((share[other] > 0.9).sum()),
                         lines_partial=int(((share > 0.05) & (share < 0.9)).sum()), tail=gaps,
                         held_total=float(seen.numel()) / denom))
stream.close()
json.dump(dict(budget=budget, policy=pol, bias=bias, rows=rows, seconds=time.time() - t0), open(out, "w"))
import statistics as st
keys = ["target", "sys", "same_eq", "same_whole", "other_eq", "other_whole", "lines_partial", "held_total"]
print(pol, budget, bias, "acc", sum(r["ok"] for r in rows) / len(rows), len(rows))
print({k: round(st.mean(r[k] for r in rows), 3) for k in keys})
