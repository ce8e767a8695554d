"""Long-term recall: facts planted in a stream of novel text, asked about many tokens later.

Two scenarios, both without the chat framing (raw text, so a 135M model can
complete the answer):

* **single** (reference probe): one fact early, then ``d`` tokens of filler
  from a novel for each ``d`` in ``distances``, then the question. ``trials``
  streams per distance, each with another word and another stretch of filler.
  Accuracy by distance.
* **multi** (many rounds): every round brings ``round_tokens`` of filler and a
  new fact (a name paired with a word); round ``r`` then asks about the fact
  of round ``r - lag`` for every ``lag`` in ``lags`` (so each distance is
  asked about across the whole stream, ``len(lags)`` questions a round: 100
  rounds give about 300 questions). Questions and answers stay in the
  stream, so facts that were asked about (and attended to) stay "hot": stale
  saddles that can crowd out the newer facts, the case Inf-MLLM's bias is
  for. Accuracy by lag (and its mean distance in tokens) with Wilson 95%
  intervals. ``full`` streams in episodes that fit the model's context.

The facts are "Note: remember the pair <name> <word>." and the question ends
"... the pair was <name>", so the word to recall directly follows the name
it was paired with: with a full cache SmolLM2-135M ranks it first among 10
candidates in 8-9 of 9 questions, while it does not bind names to words in a
"<name>'s code word is <word>" form (it then copies the most recent fact).

Scoring, for each question: the question chunk's last logits give the
log-probability of each of ``candidates`` single-token words (the planted one
and distractors; in ``multi`` the distractors are words never planted in the
stream unless ``distractors: planted``); the answer is right if the planted
word ranks first. This needs no extra forward pass and commits nothing to the
stream. Then the model answers free-form (greedy, ``free_form_tokens``
tokens, committed to the stream as ``ask`` does); ``free_form_rate`` is the
share of answers that contain the word.
"""

from __future__ import annotations

import random
import time

import torch

from .common import (BenchConfig, append_in_chunks, data_file, emit, get_model, greedy_decode, progress, pyplot,
                     raw_stream, record, run_label, save_figure, variants, wilson)

#: candidate answers; only those that are one token (with a leading space) for the model's tokenizer are used
WORDS = ("tiger horse apple lemon river castle pencil garden rabbit silver dragon candle mirror violin rocket "
         "tomato pepper orange purple window bottle jacket monkey turtle basket pillow hammer ticket button "
         "camera spider banana cherry forest island wizard pirate anchor rocket planet summer winter engine "
         "doctor kitten puppy lion wolf bear eagle snake shark whale goat sheep cow pig duck frog fox owl bee "
         "bread cheese honey sugar salt coffee milk water stone glass paper metal wood gold iron copper").split()
NAMES = ("Anna Ben Carl Dora Emil Fiona George Hanna Ivan Julia Karl Lena Mark Nina Oscar Paula Quentin Rosa "
         "Simon Tara Umar Vera Walter Xenia Yusuf Zoe Adam Bella Chris Diana Eric Flora Gustav Helga Igor Jana "
         "Kurt Lisa Max Nora Otto Petra").split()


def single_token_words(tokenizer) -> dict[str, int]:
    out = {}
    for word in dict.fromkeys(WORDS):
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out[word] = ids[0]
    return out


def _filler(text: str, tokenizer, tokens: int, rng: random.Random) -> torch.Tensor:
    """``tokens`` token ids of novel text starting at a random paragraph."""
    start = rng.randrange(0, max(1, len(text) - tokens * 8))
    start = text.find("\n\n", start) + 2 if text.find("\n\n", start) >= 0 else start
    ids = tokenizer(text[start:start + tokens * 8], add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[:, :tokens]


def candidate_rank(logits: torch.Tensor, right: str, candidates: dict[str, int]) -> int:
    """1 + how many candidate words the next-token logits score above the right one."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    scores = {w: float(logp[t]) for w, t in candidates.items()}
    return 1 + sum(1 for w, s in scores.items() if w != right and s > scores[right])


class _Asker:
    """Appends token streams in chunks, scores candidates from a question's last logits, decodes free-form."""

    def __init__(self, stream, lm, chunk: int, free_tokens: int):
        self.stream, self.lm, self.chunk, self.free_tokens = stream, lm, chunk, free_tokens

    def encode(self, text: str) -> torch.Tensor:
        return self.lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def feed(self, ids: torch.Tensor, bar=None) -> None:
        append_in_chunks(self.stream, ids, self.chunk, bar)

    def ask(self, question: str, right: str, candidates: dict[str, int]) -> tuple[bool, bool, int]:
        """(ranked first, free-form contains it, rank) for one question."""
        from infmllm_ros.engine import Chunk

        ids = self.encode(question)
        logits = self.stream.append_chunk(Chunk(input_ids=ids, kind="question"), return_logits="last").logits[-1]
        rank = candidate_rank(logits, right, candidates)
        generated = greedy_decode(self.stream, logits, self.free_tokens, append_last=False)
        text = self.lm.tokenizer.decode(generated, skip_special_tokens=True).lower()
        # The last answer token goes in with the line break that closes the answer: one forward pass less.
        self.feed(torch.cat([torch.tensor([generated[-1:]]), self.encode("\n")], dim=1))
        return rank == 1, right in text.split() or f" {right}" in f" {text}", rank


def _candidates(right: str, pool: dict[str, int], prefer: list[str], k: int, rng: random.Random) -> dict[str, int]:
    chosen = [right]
    for word in rng.sample(prefer, len(prefer)) + rng.sample(list(pool), len(pool)):
        if len(chosen) >= k:
            break
        if word not in chosen:
            chosen.append(word)
    return {w: pool[w] for w in chosen}


SINGLE_QUESTION = "\n\nQuestion: what is the secret code word mentioned earlier?\nAnswer: the secret code word is"


def single_fact_trials(cfg: BenchConfig, tokenizer, text: str, pool: dict[str, int], distance: int):
    """The single-fact trials at one distance: (word, context token-id pieces, candidates) for each trial.

    Seeded by ``cfg.seed`` and the distance, so every policy (and the kvpress
    comparison, ``benchmarks/kvpress_compare.py``) sees the same streams.
    """
    rng = random.Random(cfg.seed * 1000 + int(distance))
    words = rng.sample(list(pool), len(pool))
    for trial in range(cfg.trials):
        word = words[trial % len(words)]
        fact = f"\n\nImportant: the secret code word is {word}. Remember the code word.\n\n"
        pieces = [_filler(text, tokenizer, 48, rng),
                  tokenizer(fact, add_special_tokens=False, return_tensors="pt")["input_ids"],
                  _filler(text, tokenizer, int(distance), rng)]
        yield word, pieces, _candidates(word, pool, [], cfg.candidates, rng)


def single_fact(cfg: BenchConfig, lm, variant, text: str, pool: dict[str, int], bar) -> dict:
    """Accuracy of one early fact asked after each of ``cfg.distances`` tokens of filler."""
    by_distance = {}
    for distance in cfg.distances:
        right_count = free_count = 0
        ranks = []
        for word, pieces, cands in single_fact_trials(cfg, lm.tokenizer, text, pool, distance):
            stream = raw_stream(lm, variant.stream_config(cfg))
            asker = _Asker(stream, lm, cfg.chunk, cfg.free_form_tokens)
            try:
                for piece in pieces:
                    asker.feed(piece, bar)
                ok, free, rank = asker.ask(SINGLE_QUESTION, word, cands)
            finally:
                stream.close()
            right_count += ok
            free_count += free
            ranks.append(rank)
        low, high = wilson(right_count, cfg.trials)
        by_distance[str(distance)] = {"correct": right_count, "trials": cfg.trials,
                                      "accuracy": right_count / cfg.trials, "ci_low": low, "ci_high": high,
                                      "free_form_rate": free_count / cfg.trials, "ranks": ranks}
    correct = sum(v["correct"] for v in by_distance.values())
    trials = sum(v["trials"] for v in by_distance.values())
    free = sum(v["free_form_rate"] * v["trials"] for v in by_distance.values())
    low, high = wilson(correct, trials)
    return {"single_correct": correct, "single_trials": trials, "single_accuracy": correct / max(1, trials),
            "single_ci_low": low, "single_ci_high": high,
            "single_free_form_rate": free / max(1, trials), "single_by_distance": by_distance}


def multi_round(cfg: BenchConfig, lm, variant, text: str, pool: dict[str, int], bar) -> dict:
    """Accuracy over a multi-round stream: a new fact every round, each round asks about one older fact per lag.

    Names and words come back after ``len(NAMES)`` rounds (far more than the largest lag), so the asked
    pair is always the newest with its name; distractors are words not planted in that many rounds.
    ``full`` has no budget: it starts a fresh stream (an episode) when the model's context is nearly
    full and counts questions about facts before its episode as ``not_held``.
    """
    window = len(NAMES)
    lags = sorted({int(g) for g in cfg.lags})
    if max(lags) >= window:
        raise ValueError(f"lags must be below {window} rounds (names are reused after that), got {lags}")
    if len(pool) < window + cfg.candidates:
        raise ValueError(f"{len(pool)} single-token words cannot fill {window} rounds and {cfg.candidates} candidates")
    rng = random.Random(cfg.seed + 1)
    words = rng.sample(list(pool), len(pool))
    names = rng.sample(NAMES, len(NAMES))
    context = int(getattr(lm.text_config, "max_position_embeddings", 0) or 0)
    episodic = variant.policy == "full" and context > 0
    per_round = cfg.round_tokens + 24 + len(lags) * (40 + cfg.free_form_tokens)
    stream = raw_stream(lm, variant.stream_config(cfg))
    asker = _Asker(stream, lm, cfg.chunk, cfg.free_form_tokens)
    planted: list[tuple[str, str, int, int]] = []  # (name, word, stream token index of the fact, episode)
    by_lag = {str(g): {"correct": 0, "asked": 0, "free": 0, "not_held": 0, "ranks": [], "distances": []}
              for g in lags}
    episode = 0
    try:
        for r in range(cfg.rounds):
            if episodic and stream.cache.next_position + per_round > context:
                stream.close()
                stream = raw_stream(lm, variant.stream_config(cfg))
                asker.stream = stream
                episode += 1
            name, word = names[r % len(names)], words[r % len(words)]
            asker.feed(_filler(text, lm.tokenizer, cfg.round_tokens, rng), bar)
            planted.append((name, word, stream.cache.tokens_seen, episode))
            asker.feed(asker.encode(f"\n\nNote: remember the pair {name} {word}.\n\n"), bar)
            recent = {w for _, w, _, _ in planted[-window:]}
            for lag in lags:
                if r < lag:
                    continue
                q_name, q_word, at, q_episode = planted[r - lag]
                slot = by_lag[str(lag)]
                if q_episode != episode:
                    slot["not_held"] += 1
                    continue
                if cfg.distractors == "planted":
                    others = [w for _, w, _, _ in planted[-window:] if w != q_word]
                    cands = _candidates(q_word, pool, others, cfg.candidates, rng)
                else:  # not planted lately: does the stream still hold the fact at all?
                    unplanted = {w: t for w, t in pool.items() if w not in recent}
                    cands = _candidates(q_word, {**unplanted, q_word: pool[q_word]}, [], cfg.candidates, rng)
                distance = stream.cache.tokens_seen - at
                ok, free, rank = asker.ask(f"\n\nQuestion: which word was paired with {q_name}?\n"
                                           f"Answer: the pair was {q_name}", q_word, cands)
                slot["correct"] += ok
                slot["asked"] += 1
                slot["free"] += free
                slot["ranks"].append(rank)
                slot["distances"].append(distance)
    finally:
        stream.close()
    for slot in by_lag.values():
        n = max(1, slot["asked"])
        slot["accuracy"] = slot["correct"] / n
        slot["ci_low"], slot["ci_high"] = wilson(slot["correct"], slot["asked"])
        slot["free_form_rate"] = slot.pop("free") / n
        slot["mean_distance"] = round(sum(slot["distances"]) / n)
    asked = sum(v["asked"] for v in by_lag.values())
    correct = sum(v["correct"] for v in by_lag.values())
    free = sum(v["free_form_rate"] * v["asked"] for v in by_lag.values())
    low, high = wilson(correct, asked)
    return {"multi_correct": correct, "multi_questions": asked, "multi_accuracy": correct / max(1, asked),
            "multi_ci_low": low, "multi_ci_high": high, "multi_free_form_rate": free / max(1, asked),
            "multi_not_held": sum(v["not_held"] for v in by_lag.values()), "multi_episodes": episode + 1,
            "multi_by_lag": {g: v for g, v in by_lag.items() if v["asked"] or v["not_held"]}}


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    lm = get_model(cfg, lm)
    pool = single_token_words(lm.tokenizer)
    if len(pool) < cfg.candidates:
        raise ValueError(f"only {len(pool)} single-token candidate words for this tokenizer")
    text = data_file(cfg.text).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    per_single = sum(cfg.trials * (48 + 20 + int(d) + 30) for d in cfg.distances)
    per_multi = cfg.rounds * (cfg.round_tokens + 20 + len(cfg.lags) * (cfg.free_form_tokens + 30))
    empty_single = {"single_correct": 0, "single_trials": 0, "single_accuracy": 0.0, "single_ci_low": 0.0,
                    "single_ci_high": 1.0,
                    "single_free_form_rate": 0.0, "single_by_distance": {}}
    empty_multi = {"multi_correct": 0, "multi_questions": 0, "multi_accuracy": 0.0, "multi_ci_low": 0.0,
                   "multi_ci_high": 1.0, "multi_free_form_rate": 0.0, "multi_not_held": 0, "multi_episodes": 0,
                   "multi_by_lag": {}}
    results = []
    for budget in cfg.budgets:
        lines = []
        for variant in variants(cfg, int(budget)):
            total = (per_single if "single" in cfg.scenarios else 0) + (per_multi if "multi" in cfg.scenarios else 0)
            bar = progress(total, f"recall {variant.label} b={budget}")
            started = time.perf_counter()
            try:
                single = single_fact(cfg, lm, variant, text, pool, bar) if "single" in cfg.scenarios else empty_single
                multi = multi_round(cfg, lm, variant, text, pool, bar) if "multi" in cfg.scenarios else empty_multi
            finally:
                bar.close()
            total = single["single_correct"] + multi["multi_correct"]
            questions = single["single_trials"] + multi["multi_questions"]
            free = (single["single_free_form_rate"] * single["single_trials"]
                    + multi["multi_free_form_rate"] * multi["multi_questions"])
            per_distance = {f"single@{d}": v["accuracy"] for d, v in single["single_by_distance"].items()}
            per_distance.update({f"multi@lag{g}~{v['mean_distance']}": v["accuracy"]
                                 for g, v in multi["multi_by_lag"].items()})
            line = record(cfg, lm, variant, tokens=per_single + per_multi, text=cfg.text,
                          accuracy=total / max(1, questions), free_form_rate=free / max(1, questions),
                          scenarios=list(cfg.scenarios), distractors=cfg.distractors, per_distance=per_distance,
                          candidates=cfg.candidates, trials=cfg.trials, distances=list(cfg.distances),
                          rounds=cfg.rounds, lags=list(cfg.lags), round_tokens=cfg.round_tokens, **single, **multi,
                          seconds=round(time.perf_counter() - started, 1))
            lines.append(line)
        best = best_bias(lines)
        for line in lines:
            line["best_bias"] = best
            emit(cfg, line)
        results.extend(lines)
    return results


def best_bias(lines: list[dict]):
    """The infmllm bias that serves both scenarios: max of the worse accuracy, then the mean, then the smaller bias."""
    inf = [x for x in lines if x["base_policy"] == "infmllm"]
    if not inf:
        return None
    scen = inf[0].get("scenarios", ["single", "multi"])
    acc = [f"{s}_accuracy" for s in scen]
    top = max(inf, key=lambda x: (min(x[a] for a in acc), sum(x[a] for a in acc), -x["bias"]))
    return top["bias"]


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    """Per budget: single-fact accuracy by distance (left), multi-round accuracy by lag (right)."""
    plt = pyplot()
    paths = []
    for budget in sorted({r["budget"] for r in results}):
        rows = [r for r in results if r["budget"] == budget]
        panels = [p for p in ("single", "multi") if any(r[f"{p}_questions" if p == "multi" else "single_trials"]
                                                       for r in rows)]
        panels = panels or ["single"]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        axes = dict(zip(panels, axes[0]))
        r0 = rows[0]
        for r in rows:
            style = dict(marker="o", ms=4, label=r["policy"], ls="--" if r["base_policy"] == "full" else "-")
            for name, points, x in (("single", r["single_by_distance"], lambda d, v: int(d)),
                                    ("multi", r["multi_by_lag"], lambda d, v: v["mean_distance"])):
                points = {d: v for d, v in points.items() if v.get("trials", v.get("asked"))}
                if name in axes and points:
                    acc = [v["accuracy"] for v in points.values()]
                    err = [[a - v.get("ci_low", a) for a, v in zip(acc, points.values())],
                           [v.get("ci_high", a) - a for a, v in zip(acc, points.values())]]
                    axes[name].errorbar([x(d, v) for d, v in points.items()], acc, yerr=err, capsize=3, **style)
        titles = {"single": f"single early fact ({r0['trials']} trials per distance)",
                  "multi": f"multi-round: a new fact every round, {r0['rounds']} rounds"}
        for name, ax in axes.items():
            ax.set_title(titles[name], fontsize=9)
            ax.set_xlabel("tokens between fact and question")
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel(f"ranked first of {r0['candidates']} candidates (Wilson 95%)")
            ax.legend(fontsize=7)
        fig.suptitle(f"Recall, budget {budget}, chunk {r0['chunk']}; " + run_label(r0), fontsize=8)
        path = save_figure(fig, cfg, f"recall_b{budget}")
        paths.append(path)
    return paths
