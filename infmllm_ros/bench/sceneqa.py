"""Scene-memory QA: what did the cameras see, and when? Asked across a long stream of real frame lines.

The node's own workload, end to end, without ROS:

* **The stream.** Each camera's clip (``cameras``: ``name=video``, both shared
  clips by default) is sampled at ``fps`` (the node's ``sample_rate_hz``),
  described once by the offline describer (cached per clip and describer
  version, :func:`~.common.clip_observations`) and replayed in a loop with the
  stamps advancing in real time, for ``minutes`` of stream. Every sample
  instant appends one ``frame`` chunk per camera through
  :class:`~infmllm_ros.engine.Stream` (system prompt, observation turns, the
  ``ask`` framing: the engine's own, not re-spelled here).
* **The questions.** ``questions`` per policy and budget, an equal share in
  each lag bucket (``lag_buckets``, seconds between the frame asked about and
  the question), at seeded random moments; questions and answers stay in the
  stream, as on the robot. Each names a camera and a time and asks one fact
  that the frame's line states ("How many people did camera hall see at
  22:15:03?"). The ground truth is that line's own data (the describer's
  :class:`~infmllm_ros.perception.describer.Observation` through
  :func:`observation_facts`), so the benchmark measures the memory, not the
  detector.
* **Scoring.** The question's last logits rank the candidate answers by
  log-probability (no extra forward pass); right if the true answer ranks
  first. With ``answer_cue: line`` the answer opens with the asked line's own
  head (``"22:15:03 hall:"``, a prefilled answer, as the recall benchmark's
  "the pair was Anna"): a 135M model can then copy the fact that followed that
  head in the stream, if the cache still holds it. Then the model answers
  free-form (greedy, ``free_form_tokens``), committed as ``ask`` does;
  ``free_form_rate`` is the share of answers whose first word naming a
  candidate (:func:`free_form_answer`: "The camera saw 5 people" names ``5``)
  is the truth. Without ``commit_questions`` the answer is one token (the
  question is probed on a snapshot); with it and ``answer_cue: none`` the
  rate is the node's own free-form answering, every answer kept in the stream.
* **Report.** Accuracy overall and by lag bucket with Wilson 95% intervals,
  per question type, and the accuracy of the best answer without memory
  (``prior``: the most frequent answer for that camera and question type over
  the whole stream). ``full`` has no budget: it streams until the model's
  context is nearly full, then starts a fresh stream (an *episode*); it answers
  only questions whose frame is inside its current episode (the ceiling over
  what a full cache can hold) and counts the others as ``not_held``.
* **What the memory kept.** Right after each question is answered (its
  tokens appended, so a policy that scores by the question has evicted),
  ``Stream.held_fraction`` over the asked line's tokens (every layer and KV
  head): ``line_held`` is its mean, ``asked_kept`` counts the questions whose
  line was at least half held (:data:`KEPT_SHARE`), ``accuracy_kept`` /
  ``accuracy_lost`` split the accuracy by it. This measures the policy alone
  (what it keeps), apart from how well the model reads what is kept.

Extending to richer observations (classes, tracks, events): add the fact to
:func:`observation_facts` and a :class:`QuestionType` that asks it.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .common import (BenchConfig, clip_observations, emit, get_model, progress, pyplot, record, run_label,
                     save_figure, variants, wilson)

#: stamp of the first sample (UTC 22:13:20): what the lines' clock reads
T0 = 1_700_000_000.0


# -- the adapter: facts a line states ---------------------------------------------------------------------


def observation_facts(obs) -> dict[str, str]:
    """The facts one describer line states, as ``{fact: answer word}``.

    Read from the structured :class:`~infmllm_ros.perception.describer.Observation`
    the line was written from, with the line's own words: ``people`` is
    ``"no"`` or the count of detected persons (``"3"``); ``anyone:<region>`` is
    ``"yes"``/``"no"`` for each third of the view (a person's box centre in it);
    ``light`` is the first word of the light phrase (``"normal"``, ``"dim"`` ...;
    the line names it only when it is not normal); ``colour`` the first dominant
    colour name of the frame (not in the line).
    """
    from infmllm_ros.perception.tracking import REGIONS

    facts = {"people": "no" if obs.people == 0 else str(obs.people)}
    regions = {o.region for o in obs.objects if o.label == "person"}
    for region in REGIONS:
        facts[f"anyone:{region}"] = "yes" if region in regions else "no"
    facts["light"] = (obs.light or "normal light").split()[0]
    facts["colour"] = (obs.colour or "unknown").split()[0]
    return facts


#: How a line states an answer where the line cue leads to it: zero people is "nothing detected".
LINE_WORDS = {"no": "nothing"}

#: Other words a free-form answer may name a candidate with ("five people", "nobody", "No one").
ANSWER_WORDS = {"0": "no", "zero": "no", "none": "no", "nobody": "no", "nothing": "no", "one": "1", "two": "2",
                "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}

#: "no" names the answer only as an answer's first word or before these ("no one", "no people"); elsewhere
#: it is a refusal or an aside ("I have no record", "there were no cars but 3 people")
NO_BEFORE = {"one", "people", "person", "body"}


@dataclass(frozen=True)
class QuestionType:
    """One kind of question: which fact it asks, how, and the answers ranked.

    ``text`` may use ``{camera}``, ``{time}`` (``HH:MM:SS``) and ``{region}``.
    ``cue`` says whether the fact is the first thing the line states after its
    head, so that the ``line`` answer cue leads straight to it.
    """

    fact: str
    text: str
    candidates: tuple[str, ...]
    cue: bool = False


QUESTION_TYPES: dict[str, QuestionType] = {
    "people": QuestionType("people", "How many people did camera {camera} see at {time}?",
                           ("no", "1", "2", "3", "4", "5", "6", "7", "8", "9"), cue=True),
    "anyone_left": QuestionType("anyone:left", "Was anyone on the left of camera {camera}'s view at {time}?",
                                ("yes", "no")),
    "anyone_right": QuestionType("anyone:right", "Was anyone on the right of camera {camera}'s view at {time}?",
                                 ("yes", "no")),
}


# -- the stream and the questions -------------------------------------------------------------------------


@dataclass
class Line:
    """One frame line of the stream, as appended, with the facts it states."""

    index: int
    sample: int  # sample instant (0, 1, ...); all cameras' lines of an instant share it
    camera: str
    stamp: float
    text: str
    facts: dict


@dataclass
class Question:
    after: int  # asked once line ``after`` (the last line of its sample instant) is in the stream
    target: int  # the line asked about
    kind: str
    text: str
    camera: str
    cue: str
    right: str
    candidates: list
    lag_s: float
    bucket: int


def parse_cameras(cameras) -> list[tuple[str, str]]:
    out = []
    for item in cameras:
        name, sep, video = str(item).partition("=")
        if not sep or not name.strip() or not video.strip():
            raise ValueError(f"cameras entries are 'name=video', got {item!r}")
        out.append((name.strip(), video.strip()))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"camera names must differ: {cameras}")
    return out


def clock(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(stamp))


def build_lines(cfg: BenchConfig) -> tuple[list[Line], dict]:
    """The stream's frame lines.

    Every ``cameras`` entry is a continuous camera: one line per sample
    instant, its clip looped. Every ``event_cameras`` entry delivers a frame
    only now and then (a motion-triggered camera), at seeded random intervals
    drawn uniformly from ``event_interval_s``; its frames come from its clip at
    the same stream time. Stamps advance ``1 / fps`` per sample instant.
    """
    from infmllm_ros.perception.describer import FrameDescriber

    steady = parse_cameras(cfg.cameras)
    events = parse_cameras(cfg.event_cameras)
    if {n for n, _ in steady} & {n for n, _ in events}:
        raise ValueError("a camera cannot be both continuous and event-driven")
    clips, describe_s = {}, {}
    for name, video in steady + events:
        clips[name], describe_s[name] = clip_observations(video, cfg.fps, name, cfg.out, cfg.clip_frames)
    formatter = FrameDescriber()  # formats lines only; never describes a frame here
    samples = int(round(cfg.minutes * 60 * cfg.fps))
    rng = random.Random(cfg.seed + 7)
    low, high = (float(x) for x in cfg.event_interval_s)
    fires: dict[int, list[str]] = {}
    for name, _ in events:
        k = int(rng.uniform(0, high) * cfg.fps)
        while k < samples:
            fires.setdefault(k, []).append(name)
            k += max(1, int(round(rng.uniform(low, high) * cfg.fps)))
    lines = []
    for k in range(samples):
        stamp = T0 + k / cfg.fps
        for name in [n for n, _ in steady] + fires.get(k, []):
            obs = replace(clips[name][k % len(clips[name])], stamp=stamp, camera=name)
            lines.append(Line(len(lines), k, name, stamp, formatter.format_line(obs) + "\n", observation_facts(obs)))
    return lines, {"describe_s_per_frame": describe_s, "clip_frames": {n: len(c) for n, c in clips.items()}}


def bucket_labels(edges) -> list[str]:
    return [f"{edges[i]:g}-{edges[i + 1]:g}s" for i in range(len(edges) - 1)]


def make_questions(cfg: BenchConfig, lines: list[Line]) -> list[Question]:
    """``cfg.questions`` questions, an equal share per lag bucket, in the order they are asked (seeded).

    A question is asked right after a sample instant's lines, about the
    newest line of one camera (``question_cameras``: ``event`` for the
    event-driven cameras, ``all`` for every camera) from an earlier instant;
    its lag is the time between the two.
    """
    rng = random.Random(cfg.seed)
    edges = [float(e) for e in cfg.lag_buckets]
    kinds = [str(k) for k in cfg.question_types]
    unknown = [k for k in kinds if k not in QUESTION_TYPES]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; known: {sorted(QUESTION_TYPES)}")
    event_names = {n for n, _ in parse_cameras(cfg.event_cameras)}
    asked_about = event_names if cfg.question_cameras == "event" else {line.camera for line in lines}
    if not asked_about:
        raise ValueError("question_cameras 'event' needs event_cameras")
    last_of_sample = {line.sample: line.index for line in lines}
    # (ask instant, target line) pairs by bucket: the target is its camera's newest line before the instant
    pairs: dict[int, list[tuple[int, Line]]] = {b: [] for b in range(len(edges) - 1)}
    newest: dict[str, Line] = {}
    by_sample: dict[int, list[Line]] = {}
    for line in lines:
        by_sample.setdefault(line.sample, []).append(line)
    for k in sorted(by_sample):
        for camera, target in newest.items():
            lag = (k - target.sample) / cfg.fps
            for b in pairs:
                if edges[b] <= lag < edges[b + 1]:
                    pairs[b].append((k, target))
        for line in by_sample[k]:
            if line.camera in asked_about:
                newest[line.camera] = line
    usable = [b for b in pairs if pairs[b]]
    if not usable:
        raise ValueError("no question fits the lag buckets: lengthen the stream or lower the first bucket")
    out = []
    per_bucket = math.ceil(cfg.questions / len(usable))
    for b in usable:
        made = tries = 0
        while made < per_bucket and tries < 100 * per_bucket:
            tries += 1
            ask, target = rng.choice(pairs[b])
            kind = rng.choice(kinds)
            qt = QUESTION_TYPES[kind]
            right = target.facts.get(qt.fact)
            if right not in qt.candidates:
                continue  # e.g. 10 or more people: not among the candidates
            when = clock(target.stamp)
            # The cue is the line's own head (with its light word when the line has one) and ends with
            # the space before its first object ("hall:", " ", "3" as tokens), so the next token is
            # what the line says first. A cued question is asked only where that is the answer: the
            # count when people lead the line, "nothing" (answer "no") for "nothing detected". Where
            # other objects lead the line, the cue leads to them, not to the answer.
            head, _, body = target.text.partition(": ")
            cue = f"{head}: " if cfg.answer_cue == "line" and qt.cue else ""
            if cue and body.split(" ", 1)[0] != LINE_WORDS.get(right, right):
                continue
            out.append(Question(after=last_of_sample[ask], target=target.index, kind=kind,
                                text=qt.text.format(camera=target.camera, time=when), camera=target.camera,
                                cue=cue, right=right, candidates=list(qt.candidates),
                                lag_s=(ask - target.sample) / cfg.fps, bucket=b))
            made += 1
    out.sort(key=lambda q: (q.after, q.lag_s))
    return out


def candidate_tokens(tokenizer, words, capital: bool = False) -> dict[str, int]:
    """The first token of each candidate answer (as the answer's first word); they must differ."""
    ids = {w: tokenizer(w[:1].upper() + w[1:] if capital else w, add_special_tokens=False)["input_ids"][0]
           for w in words}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"candidate answers {list(words)} share a first token: they cannot be ranked")
    return ids


def question_tokens(tokenizer, questions) -> dict[tuple[str, bool], dict[str, int]]:
    """Per (question type, asked with a line cue): each candidate's first token, as :func:`candidate_tokens`.

    After the line cue a candidate is scored by the word the line would write there (``LINE_WORDS``); an
    answer without the cue starts a sentence, so its candidates are capitalised ("Yes", "No").
    """
    tokens = {}
    for q in questions:
        key = (q.kind, bool(q.cue))
        if key in tokens:
            continue
        said = {w: LINE_WORDS.get(w, w) if q.cue else w for w in q.candidates}
        ids = candidate_tokens(tokenizer, list(said.values()), capital=not q.cue)
        tokens[key] = {w: ids[said[w]] for w in q.candidates}
    return tokens


def prior_answers(lines: list[Line]) -> dict[tuple[str, str], str]:
    """(camera, fact) -> the most frequent answer over the stream: the best guess without memory."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for line in lines:
        for fact, value in line.facts.items():
            slot = counts.setdefault((line.camera, fact), {})
            slot[value] = slot.get(value, 0) + 1
    return {key: max(c, key=lambda v: (c[v], v)) for key, c in counts.items()}


# -- running one variant ----------------------------------------------------------------------------------


@dataclass
class _Tally:
    asked: int = 0
    correct: int = 0
    free: int = 0
    prior: int = 0
    not_held: int = 0
    kept: int = 0  # questions whose line the cache still held at least KEPT_SHARE of
    correct_kept: int = 0
    lags: list = field(default_factory=list)
    distances: list = field(default_factory=list)
    ranks: list = field(default_factory=list)
    shares: list = field(default_factory=list)

    def add(self, ok: bool, free: bool, prior: bool, rank: int, lag: float, distance: int, share: float) -> None:
        self.asked += 1
        self.correct += ok
        self.free += free
        self.prior += prior
        self.kept += share >= KEPT_SHARE
        self.correct_kept += ok and share >= KEPT_SHARE
        self.ranks.append(rank)
        self.lags.append(lag)
        self.distances.append(distance)
        self.shares.append(round(share, 3))

    def summary(self) -> dict:
        lo, hi = wilson(self.correct, self.asked)
        n = max(1, self.asked)
        kept_ci = list(wilson(self.correct_kept, self.kept)) if self.kept else None
        lost = self.asked - self.kept
        return {"asked": self.asked, "correct": self.correct, "accuracy": self.correct / n, "ci_low": lo,
                "ci_high": hi, "free_form_rate": self.free / n, "prior_accuracy": self.prior / n,
                "not_held": self.not_held, "mean_lag_s": round(sum(self.lags) / n, 1),
                "mean_distance": round(sum(self.distances) / n),
                "line_held": round(sum(self.shares) / n, 4), "asked_kept": self.kept,
                "accuracy_kept": self.correct_kept / self.kept if self.kept else None,
                "ci_kept": kept_ci,
                "accuracy_lost": (self.correct - self.correct_kept) / lost if lost else None,
                "ranks": self.ranks, "shares": self.shares}


_WORD = re.compile(r"[a-z0-9]+")


def free_form_answer(text: str, candidates) -> Optional[str]:
    """The candidate a free-form answer names first, or None.

    Words are read in order (lower case); a word counts if it is a candidate
    or names one (:data:`ANSWER_WORDS`): "The camera saw 5 people and 1 car"
    -> ``"5"``, "Nobody was there" -> ``"no"``, "Yes." -> ``"yes"``; "I do
    not know" and "I have no record" name none (words are whole: "not" is
    not "no"; a later "no" counts only before :data:`NO_BEFORE`).
    """
    wanted = set(candidates)
    words = _WORD.findall(text.lower())
    for i, word in enumerate(words):
        if word == "no" and i > 0 and (i + 1 == len(words) or words[i + 1] not in NO_BEFORE):
            continue
        for name in (word, ANSWER_WORDS.get(word)):
            if name in wanted:
                return name
    return None


#: A question's line counts as kept when the cache holds at least this share of its tokens over all
#: layers and heads (``Stream.held_fraction`` at the moment of the question).
KEPT_SHARE = 0.5


def run_variant(cfg: BenchConfig, lm, variant, lines, questions, prior, bar) -> dict:
    from infmllm_ros.engine import Chunk, Stream

    context = int(getattr(lm.text_config, "max_position_embeddings", 0) or 0)
    episodic = variant.policy == "full" and context > 0
    reserve = 192 + cfg.scene_tokens  # room for a question, its cue, the answer and the turn marks
    tokens = question_tokens(lm.tokenizer, questions)
    period = int(round(cfg.scene_period_s * cfg.fps)) if cfg.scene_period_s > 0 else 0
    last_of_sample = {line.sample: line.index for line in lines}
    stream = Stream(lm, variant.stream_config(cfg))
    total, by_bucket, by_kind = _Tally(), {}, {}
    seen_at: dict[int, int] = {}
    line_tokens: dict[int, int] = {}
    episode_start, episodes, qi, scenes = 0, 1, 0, 0
    try:
        for line in lines:
            ids = lm.tokenizer(line.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if episodic and stream.cache.next_position + ids.shape[1] + reserve > context:
                stream.reset()
                episode_start, episodes = line.index, episodes + 1
            seen_at[line.index] = stream.cache.tokens_seen
            line_tokens[line.index] = int(ids.shape[1])
            stream.append_chunk(Chunk(input_ids=ids, kind="frame", camera=line.camera, stamp=line.stamp,
                                      text=line.text))
            bar.update(1)
            if period and last_of_sample[line.sample] == line.index and (line.sample + 1) % period == 0:
                stream.ask(cfg.scene_prompt, max_new_tokens=cfg.scene_tokens)  # the node's SceneDescription
                scenes += 1
            while qi < len(questions) and questions[qi].after == line.index:
                q = questions[qi]
                qi += 1
                slots = (total, by_bucket.setdefault(q.bucket, _Tally()), by_kind.setdefault(q.kind, _Tally()))
                if q.target < episode_start or (episodic and stream.cache.next_position + reserve > context):
                    for slot in slots:
                        slot.not_held += 1
                    continue
                distance = stream.cache.tokens_seen - seen_at[q.target]
                saved = None if cfg.commit_questions else stream.snapshot()
                answer = stream.ask(q.text, camera=q.camera, answer_prefix=q.cue, return_first_logits=True,
                                    max_new_tokens=cfg.free_form_tokens if cfg.commit_questions else 1)
                # What the model answered from: the cache once the question (and the answer's cue and
                # first token) arrived, which is when a policy that scores by the question evicts.
                share = stream.held_fraction(seen_at[q.target], seen_at[q.target] + line_tokens[q.target])
                if saved is not None:
                    stream.restore(saved)
                logp = torch.log_softmax(answer.first_logits.float(), dim=-1)
                scores = {w: float(logp[t]) for w, t in tokens[(q.kind, bool(q.cue))].items()}
                rank = 1 + sum(1 for w, s in scores.items() if w != q.right and s > scores[q.right])
                free = free_form_answer(answer.text, q.candidates) == q.right
                guess = prior[(q.camera, QUESTION_TYPES[q.kind].fact)] == q.right
                for slot in slots:
                    slot.add(rank == 1, free, guess, rank, q.lag_s, distance, share)
        stats = stream.stats()
    finally:
        stream.close()
    labels = bucket_labels(cfg.lag_buckets)
    out = total.summary()
    out.pop("ranks")
    out.pop("shares")
    return {**out, "by_bucket": {labels[b]: by_bucket[b].summary() for b in sorted(by_bucket)},
            "by_type": {k: {key: v for key, v in t.summary().items() if key not in ("ranks", "shares")}
                        for k, t in by_kind.items()},
            "episodes": episodes, "scene_descriptions": scenes, "tokens_seen": stats.tokens_seen,
            "tokens_held_end": stats.tokens_held}


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    lm = get_model(cfg, lm)
    lines, meta = build_lines(cfg)
    questions = make_questions(cfg, lines)
    prior = prior_answers(lines)
    results = []
    for budget in cfg.budgets:
        for variant in variants(cfg, int(budget)):
            bar = progress(len(lines), f"sceneqa {variant.label} b={budget}", unit="line")
            started = time.perf_counter()
            try:
                figures = run_variant(cfg, lm, variant, lines, questions, prior, bar)
            finally:
                bar.close()
            line = record(cfg, lm, variant, tokens=figures.pop("tokens_seen"), minutes=cfg.minutes, fps=cfg.fps,
                          cameras=list(cfg.cameras), lines=len(lines), question_types=list(cfg.question_types),
                          answer_cue=cfg.answer_cue, lag_buckets=list(cfg.lag_buckets), seed=cfg.seed, **meta,
                          **figures, seconds=round(time.perf_counter() - started, 1))
            emit(cfg, line)
            results.append(line)
    return results


# -- plots ------------------------------------------------------------------------------------------------


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    """Per budget: accuracy by lag bucket with Wilson 95% intervals, one line per policy, and the prior;
    beside it, the mean share of the asked line each policy still held (``line_held``), by the same lags."""
    plt = pyplot()
    paths = []
    for budget in sorted({r["budget"] for r in results if r["base_policy"] != "full"}):
        rows = [r for r in results if r["budget"] == budget or r["base_policy"] == "full"]
        labels = bucket_labels(rows[0]["lag_buckets"])
        held = any("line_held" in slot for r in rows for slot in r["by_bucket"].values())
        fig, axes = plt.subplots(1, 2 if held else 1, figsize=(14 if held else 9, 4.5), squeeze=False)
        ax = axes[0][0]
        n = len(rows)
        for j, r in enumerate(rows):
            xs, ys, lo, hi, kept_x, kept_y = [], [], [], [], [], []
            for i, label in enumerate(labels):
                slot = r["by_bucket"].get(label)
                if slot and slot["asked"]:
                    xs.append(i + (j - (n - 1) / 2) * 0.06)
                    ys.append(slot["accuracy"])
                    lo.append(slot["accuracy"] - slot["ci_low"])
                    hi.append(slot["ci_high"] - slot["accuracy"])
                    if "line_held" in slot:
                        kept_x.append(i)
                        kept_y.append(slot["line_held"])
            style = "--" if r["base_policy"] == "full" else "-"
            line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=3, lw=1.2, ls=style,
                               label=f"{r['policy']} ({r['accuracy']:.2f}, n={r['asked']})")
            if held and kept_x:
                axes[0][1].plot(kept_x, kept_y, marker="o", ms=4, lw=1.2, ls=style, color=line[0].get_color(),
                                label=f"{r['policy']} ({r.get('line_held', float('nan')):.2f})")
        ref = max(rows, key=lambda r: r["asked"])
        prior = [ref["by_bucket"][lb]["prior_accuracy"] if lb in ref["by_bucket"] else float("nan") for lb in labels]
        ax.plot(range(len(labels)), prior, color="grey", ls=":", label="no memory (most frequent answer)")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("lag between the frame asked about and the question")
        ax.set_ylabel("right answer ranked first (Wilson 95%)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        if held:
            kept = axes[0][1]
            kept.set_xticks(range(len(labels)), labels)
            kept.set_xlabel("lag between the frame asked about and the question")
            kept.set_ylabel("share of the asked line held (layers x KV heads)")
            kept.set_ylim(-0.02, 1.02)
            kept.legend(fontsize=7)
        r0 = rows[0]
        fig.suptitle(f"Scene-memory QA, budget {budget}: {r0['minutes']:g} min of {', '.join(r0['cameras'])} "
                     f"at {r0['fps']:g} Hz\n" + run_label(r0), fontsize=8)
        paths.append(save_figure(fig, cfg, f"sceneqa_b{budget}"))
    return paths
