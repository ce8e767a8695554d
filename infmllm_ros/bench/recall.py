"""Long-term recall: facts planted in a stream of novel text, asked about many tokens later.

Two scenarios, both without the chat framing (raw text, so a 135M model can
complete "the code word is ..."):

* **single** (reference probe): one fact early, ``distance`` tokens of filler
  from a novel, then the question. ``trials`` streams, each with another
  word and another stretch of filler.
* **multi** (many rounds): every round brings ``round_tokens`` of filler and a
  new fact about a new name; from round ``lag`` on, each round also asks
  about the fact of ``lag`` rounds before. Questions and answers stay in the
  stream, so facts that were asked about (and attended to) stay "hot": stale
  saddles that crowd out the newer facts, the case Inf-MLLM's bias is for.

Scoring, for each question: the question chunk's last logits give the
log-probability of each of ``candidates`` single-token words (the planted one
and distractors, including other words planted in the same stream); the
answer is right if the planted word ranks first. This needs no extra forward
pass and commits nothing to the stream. Then the model answers free-form
(greedy, ``free_form_tokens`` tokens, committed to the stream as ``ask``
does); ``free_form_rate`` is the share of answers that contain the word.
"""

from __future__ import annotations

import random
import time

import torch

from .common import run_label, save_figure, BenchConfig, data_file, emit, get_model, progress, pyplot, raw_stream, record, variants

#: candidate answers; only those that are one token (with a leading space) for the model's tokenizer are used
WORDS = ("tiger horse apple lemon river castle pencil garden rabbit silver dragon candle mirror violin rocket "
         "tomato pepper orange purple window bottle jacket monkey turtle basket pillow hammer ticket button "
         "camera spider banana cherry forest island wizard pirate anchor rocket planet summer winter engine "
         "doctor kitten puppy lion wolf bear eagle snake shark whale goat sheep cow pig duck frog fox owl bee "
         "bread cheese honey sugar salt coffee milk water stone glass paper metal wood gold iron copper").split()
NAMES = ("Anna Ben Carl Dora Emil Fiona George Hanna Ivan Julia Karl Lena Mark Nina Oscar Paula Quentin Rosa "
         "Simon Tara Umar Vera Walter Xenia Yusuf Zoe").split()


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


class _Asker:
    """Appends token streams in chunks, scores candidates from a question's last logits, decodes free-form."""

    def __init__(self, stream, lm, chunk: int, free_tokens: int):
        self.stream, self.lm, self.chunk, self.free_tokens = stream, lm, chunk, free_tokens

    def encode(self, text: str) -> torch.Tensor:
        return self.lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def feed(self, ids: torch.Tensor, bar=None) -> None:
        from infmllm_ros.engine import Chunk

        for start in range(0, ids.shape[1], self.chunk):
            piece = ids[:, start:start + self.chunk]
            self.stream.append_chunk(Chunk(input_ids=piece))
            if bar is not None:
                bar.update(piece.shape[1])

    def ask(self, question: str, right: str, candidates: dict[str, int]) -> tuple[bool, bool, int]:
        """(ranked first, free-form contains it, rank) for one question."""
        from infmllm_ros.engine import Chunk

        ids = self.encode(question)
        logits = self.stream.append_chunk(Chunk(input_ids=ids, kind="question"), return_logits=True).logits[-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        scores = {w: float(logp[t]) for w, t in candidates.items()}
        rank = 1 + sum(1 for w, s in scores.items() if w != right and s > scores[right])
        generated = []
        cache = self.stream.cache
        cache.decoding = True
        try:
            for _ in range(self.free_tokens):
                token = int(logits.argmax())
                generated.append(token)
                logits = self.stream.append_chunk(Chunk(input_ids=torch.tensor([[token]]), kind="answer"),
                                                  return_logits=True).logits[-1]
        finally:
            cache.decoding = False
        text = self.lm.tokenizer.decode(generated, skip_special_tokens=True).lower()
        self.feed(self.encode("\n"))
        return rank == 1, right in text.split() or f" {right}" in f" {text}", rank


def _candidates(right: str, pool: dict[str, int], prefer: list[str], k: int, rng: random.Random) -> dict[str, int]:
    chosen = [right]
    for word in rng.sample(prefer, len(prefer)) + rng.sample(list(pool), len(pool)):
        if len(chosen) >= k:
            break
        if word not in chosen:
            chosen.append(word)
    return {w: pool[w] for w in chosen}


def single_fact(cfg: BenchConfig, lm, variant, text: str, pool: dict[str, int], bar) -> dict:
    rng = random.Random(cfg.seed)
    words = rng.sample(list(pool), len(pool))
    right_count = free_count = 0
    ranks = []
    for trial in range(cfg.trials):
        word = words[trial % len(words)]
        stream = raw_stream(lm, variant.stream_config(cfg))
        asker = _Asker(stream, lm, cfg.chunk, cfg.free_form_tokens)
        try:
            asker.feed(_filler(text, lm.tokenizer, 48, rng), bar)
            asker.feed(asker.encode(f"\n\nImportant: the secret code word is {word}. Remember the code word.\n\n"),
                       bar)
            asker.feed(_filler(text, lm.tokenizer, cfg.distance, rng), bar)
            cands = _candidates(word, pool, [], cfg.candidates, rng)
            ok, free, rank = asker.ask("\n\nQuestion: what is the secret code word mentioned earlier?\n"
                                       "Answer: the secret code word is", word, cands)
        finally:
            stream.close()
        right_count += ok
        free_count += free
        ranks.append(rank)
    return {"single_correct": right_count, "single_trials": cfg.trials, "single_accuracy": right_count / cfg.trials,
            "single_free_form_rate": free_count / cfg.trials, "single_ranks": ranks}


def multi_round(cfg: BenchConfig, lm, variant, text: str, pool: dict[str, int], bar) -> dict:
    rng = random.Random(cfg.seed + 1)
    words = rng.sample(list(pool), len(pool))
    names = rng.sample(NAMES, len(NAMES))
    stream = raw_stream(lm, variant.stream_config(cfg))
    asker = _Asker(stream, lm, cfg.chunk, cfg.free_form_tokens)
    planted: list[tuple[str, str, int]] = []  # (name, word, stream token index of the fact)
    asked = correct = free_count = 0
    distances = []
    ranks = []
    try:
        for r in range(cfg.rounds):
            name, word = names[r % len(names)], words[r % len(words)]
            asker.feed(_filler(text, lm.tokenizer, cfg.round_tokens, rng), bar)
            planted.append((name, word, stream.cache.tokens_seen))
            asker.feed(asker.encode(f"\n\nNote: {name}'s code word is {word}.\n\n"), bar)
            if r >= cfg.lag:
                q_name, q_word, at = planted[r - cfg.lag]
                others = [w for _, w, _ in planted if w != q_word]
                if cfg.distractors == "planted":
                    cands = _candidates(q_word, pool, others, cfg.candidates, rng)
                else:  # never planted: does the stream still hold the fact at all?
                    unplanted = {w: t for w, t in pool.items() if w not in others and w not in words[:cfg.rounds]}
                    cands = _candidates(q_word, {**unplanted, q_word: pool[q_word]}, [], cfg.candidates, rng)
                distances.append(stream.cache.tokens_seen - at)
                ok, free, rank = asker.ask(f"\n\nQuestion: what is {q_name}'s code word?\n"
                                           f"Answer: {q_name}'s code word is", q_word, cands)
                asked += 1
                correct += ok
                free_count += free
                ranks.append(rank)
    finally:
        stream.close()
    return {"multi_correct": correct, "multi_questions": asked, "multi_accuracy": correct / max(1, asked),
            "multi_free_form_rate": free_count / max(1, asked), "multi_ranks": ranks,
            "multi_mean_distance": round(sum(distances) / max(1, len(distances)))}


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    lm = get_model(cfg, lm)
    pool = single_token_words(lm.tokenizer)
    if len(pool) < cfg.candidates:
        raise ValueError(f"only {len(pool)} single-token candidate words for this tokenizer")
    text = data_file(cfg.text).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    per_trial = 48 + 20 + cfg.distance + 30
    per_round = cfg.round_tokens + 20 + cfg.free_form_tokens + 30
    results = []
    for budget in cfg.budgets:
        lines = []
        for variant in variants(cfg, int(budget)):
            total = (cfg.trials * per_trial if "single" in cfg.scenarios else 0) + (
                cfg.rounds * per_round if "multi" in cfg.scenarios else 0)
            bar = progress(total, f"recall {variant.label} b={budget}")
            started = time.perf_counter()
            empty_single = {"single_correct": 0, "single_trials": 0, "single_accuracy": 0.0,
                            "single_free_form_rate": 0.0, "single_ranks": []}
            empty_multi = {"multi_correct": 0, "multi_questions": 0, "multi_accuracy": 0.0,
                           "multi_free_form_rate": 0.0, "multi_ranks": [], "multi_mean_distance": 0}
            try:
                single = single_fact(cfg, lm, variant, text, pool, bar) if "single" in cfg.scenarios else empty_single
                multi = multi_round(cfg, lm, variant, text, pool, bar) if "multi" in cfg.scenarios else empty_multi
            finally:
                bar.close()
            total = single["single_correct"] + multi["multi_correct"]
            questions = single["single_trials"] + multi["multi_questions"]
            free = (single["single_free_form_rate"] * single["single_trials"]
                    + multi["multi_free_form_rate"] * multi["multi_questions"])
            line = record(cfg, lm, variant, tokens=per_trial, text=cfg.text, accuracy=total / max(1, questions),
                          free_form_rate=free / max(1, questions), scenarios=list(cfg.scenarios),
                          distractors=cfg.distractors,
                          per_distance={str(cfg.distance): single["single_accuracy"],
                                        str(multi["multi_mean_distance"]): multi["multi_accuracy"]},
                          candidates=cfg.candidates, distance=cfg.distance, rounds=cfg.rounds, lag=cfg.lag,
                          round_tokens=cfg.round_tokens, **single, **multi,
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
    plt = pyplot()
    paths = []
    for budget in sorted({r["budget"] for r in results}):
        rows = [r for r in results if r["budget"] == budget]
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["single_accuracy"] for r in rows], 0.4,
               label=f"single fact, {cfg.distance} tokens back")
        ax.bar([x + 0.2 for x in xs], [r["multi_accuracy"] for r in rows], 0.4,
               label=f"multi-round, fact {cfg.lag} rounds back (~{rows[0]['multi_mean_distance']} tokens)")
        ax.set_xticks(list(xs), [r["policy"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"ranked first of {cfg.candidates} candidates")
        r0 = rows[0]
        ax.set_title(f"Recall, budget {budget}, chunk {r0['chunk']}\n" +
                     run_label(r0), fontsize=9)
        ax.legend(fontsize=8)
        path = save_figure(fig, cfg, f"recall_b{budget}")
        paths.append(path)
    return paths
