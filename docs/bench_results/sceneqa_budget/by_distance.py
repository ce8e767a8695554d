"""Accuracy by how far back in the cache the asked line sits, and what the wrong answers name (a diagnostic
script, not in the package; docs/benchmarks.md section 11e). Reads ``held_lines.py``'s JSON rows:

    python by_distance.py held_lines_rule_512.json held_lines_rule_1024.json held_lines_h2o_1024.json

For each file: right / asked by ``between`` (held rows newer than the asked line, in steps of 128), the
mean ``between`` by lag bucket, and the most frequent (truth, answer) pairs among the wrong answers with how
many of them name the count of the line appended just before the question.
"""
import collections
import json
import statistics
import sys

from infmllm_ros.bench import sceneqa as S
from infmllm_ros.bench.common import load_config

STEP = 128
cfg = load_config("sceneqa", {"minutes": 4.0, "out": "docs/bench_results/sceneqa"}, quick=False)
lines, _ = S.build_lines(cfg)
questions = S.make_questions(cfg, lines)
for path in sys.argv[1:]:
    rows = json.load(open(path))["rows"]
    if len(rows) != len(questions):
        sys.exit(f"{path}: {len(rows)} rows for {len(questions)} questions (another stream?)")
    cells = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        cell = cells[int(r["between"] // STEP)]
        cell[0] += r["ok"]
        cell[1] += 1
    near = [r for r in rows if r["between"] < 512]
    print(f"{path}: {sum(r['ok'] for r in rows)}/{len(rows)} right, mean between {statistics.mean(r['between'] for r in rows):.0f}; "
          f"within 512 held rows {sum(r['ok'] for r in near)}/{len(near)}, beyond {sum(r['ok'] for r in rows) - sum(r['ok'] for r in near)}/{len(rows) - len(near)}")
    print("  by between:", ", ".join(f"{k * STEP}-{(k + 1) * STEP}: {c[0]}/{c[1]}" for k, c in sorted(cells.items())))
    buckets = sorted({r["bucket"] for r in rows})
    print("  mean between by lag bucket:", [round(statistics.mean(r["between"] for r in rows if r["bucket"] == b)) for b in buckets])
    wrong = [(q, r) for q, r in zip(questions, rows) if not r["ok"]]
    last = sum(r["pred"] == lines[q.after].facts.get(S.QUESTION_TYPES[q.kind].fact) for q, r in wrong)
    pairs = collections.Counter((r["right"], r["pred"]) for _, r in wrong)
    print(f"  wrong {len(wrong)}: (truth, answer) {pairs.most_common(5)}; answer = the last line's count: {last}")
