"""Eviction policies: each decides which cached tokens matter.

A policy is a small dataclass of knobs plus one ``score`` method: higher means
keep. The cache (``cache.py``) does the rest once for every policy: forced
keeps (sinks, recent window, the chunk that just arrived), the top-k, the
gather, and the re-rotation that keeps positions contiguous.

``needs`` says which attention statistics the cache must collect for a policy:
``"none"``, ``"window"`` (the new chunk's queries against every cached key,
computed once per chunk) or ``"accumulated"`` (every query's attention summed
over the whole stream, H2O's heavy-hitter statistic).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenBuffer:
    """A per-token buffer a policy asks the cache to keep beside the keys and values.

    The cache allocates it once per layer as ``[batch, kv_heads, capacity,
    *trailing]``, fills a new token's entry with ``fill`` (or with the value
    the stream gives for the step), and gathers and compacts it together with
    the keys at every eviction, so a policy never touches the cache's
    mechanics. ``score`` reads the held rows as ``view.buffers[name]`` and
    may set new values in ``view.updates[name]`` (written at the commit).
    """

    dtype: torch.dtype
    trailing: tuple[int, ...] = ()
    fill: Union[int, float] = 0


@dataclass
class ScoreView:
    """What a policy may look at, for one layer, right after a forward step.

    Shapes are ``[batch, kv_heads, tokens]`` over the tokens stored now (the
    old ones followed by the ``new_tokens`` that just arrived).
    """

    seen: torch.Tensor  # stream index of each token (0 = first token ever appended)
    new_tokens: int
    budget: int
    window_attention: Optional[torch.Tensor] = None
    accumulated_attention: Optional[torch.Tensor] = None
    #: the policy's own per-token buffers (``Policy.token_buffers``), held rows only (views)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    #: new values ``[batch, kv_heads, tokens]`` for some of ``buffers``, which ``score`` may set; the
    #: cache writes them at the commit, before compacting (so a step that fails changes nothing)
    updates: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Policy:
    """Base class. Subclasses set ``name`` and implement ``score``."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"
    #: False for policies that only evict when a chunk arrives and let the cache
    #: grow (by at most one chunk) while an answer is decoded.
    evicts_every_step: ClassVar[bool] = True
    evicts: ClassVar[bool] = True
    #: the settings a user may tune for this policy (``make_policy`` passes only these)
    knobs: ClassVar[tuple[str, ...]] = ()
    #: per-token buffers the cache keeps for this policy (name -> spec), beside ``seen`` and ``positions``
    token_buffers: ClassVar[dict[str, TokenBuffer]] = {}

    sinks: int = 0
    recent: int = 0
    per_head: bool = False
    keep_new_chunk: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{type(self).__name__}.{f.name} must be >= 0, got {value}")

    @property
    def quiet_while_decoding(self) -> bool:
        """No statistics and no eviction in a decode step while the cache has room (Inf-MLLM, full).

        Such steps need no attention hook, so the stream can run them as one
        compiled, static-shape graph.
        """
        return (not self.evicts or not self.evicts_every_step) and self.needs != "accumulated"

    def check_budget(self, budget: int, max_chunk: int) -> None:
        """Raise if ``budget`` cannot hold what this policy always keeps."""
        if not self.evicts:
            return
        recent = self.recent_tokens(budget)
        always = self.sinks + recent + (max_chunk if self.keep_new_chunk else 0)
        if budget <= self.sinks + recent:
            raise ValueError(
                f"budget of {budget} tokens leaves no room beside {self.sinks} sink and {recent} recent tokens "
                f"({self.name}); raise the budget or lower sinks/recent"
            )
        if self.keep_new_chunk and budget < always:
            raise ValueError(
                f"budget of {budget} tokens cannot keep {self.sinks} sinks + {recent} recent tokens + a whole "
                f"chunk of {max_chunk} ({self.name}); raise the budget or lower max_chunk_tokens"
            )

    def recent_tokens(self, budget: int) -> int:
        """How many of the newest tokens are always kept."""
        return self.recent

    def score(self, view: ScoreView) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Full(Policy):
    """No eviction: the reference every other policy is compared with."""

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False

    def score(self, view: ScoreView) -> torch.Tensor:
        return view.seen.to(torch.float32)


@dataclass
class Window(Policy):
    """Sliding window: keep the newest ``budget`` tokens, nothing else."""

    name: ClassVar[str] = "window"

    def score(self, view: ScoreView) -> torch.Tensor:
        return view.seen.to(torch.float32)


@dataclass
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + recent window.

    The first ``sinks`` tokens of the stream are kept for ever; the rest of the
    budget is the most recent tokens. Evicts at every step, as in the paper.
    """

    name: ClassVar[str] = "streamingllm"
    knobs: ClassVar[tuple[str, ...]] = ("sinks",)
    sinks: int = 4

    def score(self, view: ScoreView) -> torch.Tensor:
        return view.seen.to(torch.float32)


@dataclass
class H2O(Policy):
    """H2O (Zhang et al., 2023, arXiv 2306.14048): heavy hitters + recent tokens.

    A token's score is the attention it has received from every query since it
    entered the cache, summed; the cache keeps the ``recent_ratio`` share of the
    budget as the newest tokens and fills the rest with the highest scores,
    per KV head, evicting at every decoding step as in the paper.
    """

    name: ClassVar[str] = "h2o"
    needs: ClassVar[str] = "accumulated"
    token_buffers: ClassVar[dict[str, TokenBuffer]] = {"accumulated": TokenBuffer(torch.float32)}
    knobs: ClassVar[tuple[str, ...]] = ("recent_ratio", "per_head")
    recent_ratio: float = 0.5
    per_head: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio < 1.0:
            raise ValueError(f"H2O.recent_ratio must be in [0, 1), got {self.recent_ratio}")

    def recent_tokens(self, budget: int) -> int:
        return int(budget * self.recent_ratio)

    def score(self, view: ScoreView) -> torch.Tensor:
        return view.accumulated_attention


@dataclass
class InfMLLM(Policy):
    """Inf-MLLM (Ning et al., 2024, arXiv 2409.09086): recent tokens + attention saddles.

    When a chunk arrives, its last ``retrieval_window`` queries score every
    cached key (mean attention per key column, each column divided by the
    number of window queries the causal mask lets see it). The chunk itself,
    ``sinks`` initial tokens and ``recent`` older tokens are always kept; the
    rest of the budget goes to the best-scoring old tokens.

    Refinements, each off by default and measured in docs/benchmarks.md:

    * ``pool``: a token's score is the mean over the ``pool`` neighbouring
      keys around it (odd; the paper's local sum of attention, as SnapKV's
      pooling), so that a whole fact survives rather than scattered tokens.
    * ``decay``: scores carry over between chunks, ``s = a + decay * s_prev``,
      so that a saddle several chunks attended to is not dropped the moment
      one chunk looks elsewhere. With ``carry = "max"``,
      ``s = max(a, decay * s_prev)``: one strong look (a question finding its
      fact) is remembered, fading, without the steady attention every chunk
      pays to sinks and repeated templates adding up.
    * ``granularity = "chunk"``: every token scores its chunk's mean (a
      frame's line, a question with its answer), so observations are kept or
      dropped whole.
    * ``bias``: scores are normalised so that the average candidate scores 1,
      then each token loses ``bias * age / budget`` (``age`` in stream tokens
      since it arrived): the cache follows newer content. (This additive,
      budget-scaled form is our reading of the paper's bias.)
    * ``bias_frames = False`` (ours, not the paper's): frames do not count on
      the bias's clock. A token's age is the number of conversation tokens
      (system prompt, questions, answers, text) that arrived after it
      (:func:`conversation_clock`), so an hour of camera frames ages nothing
      while the talk does: the cache follows the conversation, as the bias
      is meant to, and an answer the node gave some frames ago stays as
      young as the talk since. Frame tokens rank by their carried scores
      (``decay``, which must be > 0 and then applies to frames only) over
      the mean of every token's carried score, the conversation by the
      newest chunk's look; both lose ``bias * age / budget``. A stream
      without frames is ranked exactly as with ``decay = 0`` and the default.
    """

    name: ClassVar[str] = "infmllm"
    needs: ClassVar[str] = "window"
    evicts_every_step: ClassVar[bool] = False
    knobs: ClassVar[tuple[str, ...]] = ("sinks", "recent", "retrieval_window", "bias", "per_head", "pool", "decay",
                                        "carry", "granularity", "bias_frames")
    sinks: int = 4
    recent: int = 64
    retrieval_window: int = 64
    bias: float = 0.0
    per_head: bool = True
    keep_new_chunk: bool = True
    pool: int = 1
    decay: float = 0.0
    carry: str = "sum"
    granularity: str = "token"
    bias_frames: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieval_window < 1:
            raise ValueError("InfMLLM.retrieval_window must be >= 1")
        if not self.bias >= 0.0:
            raise ValueError(f"InfMLLM.bias must be >= 0, got {self.bias}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"InfMLLM.pool must be an odd number >= 1, got {self.pool}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"InfMLLM.decay must be in [0, 1), got {self.decay}")
        if self.carry not in ("sum", "max"):
            raise ValueError(f"InfMLLM.carry must be 'sum' or 'max', got {self.carry!r}")
        if self.carry == "max" and self.decay == 0.0:
            raise ValueError("InfMLLM.carry 'max' needs decay > 0 (with decay 0 nothing is carried)")
        if self.granularity not in ("token", "chunk"):
            raise ValueError(f"InfMLLM.granularity must be 'token' or 'chunk', got {self.granularity!r}")
        if not isinstance(self.bias_frames, bool):
            raise ValueError(f"InfMLLM.bias_frames must be True or False, got {self.bias_frames!r}")
        if not self.bias_frames and self.decay == 0.0:
            raise ValueError("InfMLLM.bias_frames False needs decay > 0 (frames rank by their carried scores)")
        if not self.bias_frames and self.recent == 0 and not self.keep_new_chunk:
            raise ValueError("InfMLLM.bias_frames False needs recent > 0 or keep_new_chunk (the conversation clock "
                             "goes on from the newest row, which one of them must keep)")

    @property
    def token_buffers(self) -> dict[str, TokenBuffer]:  # type: ignore[override]
        # Per instance, not per class: only the refinements that are on cost memory.
        buffers = {}
        if self.decay > 0.0:
            # the score carried from the last eviction; 0 for a token that arrived since
            buffers["carried"] = TokenBuffer(torch.float32)
        if self.granularity == "chunk":
            # filled by the cache with the token's chunk number (see CappedCache.CHUNK)
            buffers["chunk"] = TokenBuffer(torch.long, fill=-1)
        if not self.bias_frames:
            # 1 on a frame chunk's tokens; the stream fills it (0: every other kind, a decoded answer included)
            buffers[FRAME] = TokenBuffer(torch.bool)
            if self.bias > 0.0:  # at bias 0 no age is read
                # conversation tokens before the token (see conversation_clock); -1 until its first eviction
                buffers[TALK] = TokenBuffer(torch.long, fill=-1)
        return buffers

    def score(self, view: ScoreView) -> torch.Tensor:
        look = view.window_attention
        if self.pool > 1:
            look = F.avg_pool1d(look, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
        scores = look
        if self.decay > 0.0:
            carried = self.decay * view.buffers["carried"]
            scores = scores + carried if self.carry == "sum" else torch.maximum(scores, carried)
            view.updates["carried"] = scores
        if self.granularity == "chunk":
            scores = group_mean(scores, view.buffers["chunk"])
            if not self.bias_frames:
                look = group_mean(look, view.buffers["chunk"])
        if self.bias_frames:
            return scores if self.bias == 0.0 else self._aged(_normalised(scores), view.seen, view.budget)
        frame = view.buffers[FRAME]
        if self.bias == 0.0:
            # No age to subtract: the conversation by its raw look, as the default ranks it (a cache that keeps
            # one set of rows for all heads averages them, so normalising each head first would differ), the
            # frames by their carried scores brought to the look's scale.
            return torch.where(frame, _normalised(scores) * look.mean(dim=-1, keepdim=True), look)
        talk = conversation_clock(view.buffers[TALK], frame, view.seen)
        view.updates[TALK] = talk
        return self._aged(torch.where(frame, _normalised(scores), _normalised(look)), talk, view.budget)

    def _aged(self, normalised: torch.Tensor, clock: torch.Tensor, budget: int) -> torch.Tensor:
        """The bias: ``normalised`` scores less ``bias * age / budget``, the age read on ``clock`` (rows' arrival)."""
        age = (clock.amax(dim=-1, keepdim=True) - clock).to(normalised.dtype)
        return normalised - self.bias * age / float(budget)


#: per-token buffer name of the frame flag (``InfMLLM.bias_frames = False``); the stream fills it
FRAME = "frame"
#: per-token buffer name of the conversation clock (``InfMLLM.bias_frames = False``, bias > 0); see conversation_clock
TALK = "talk"


def conversation_clock(talk: torch.Tensor, frame: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Every held row's conversation clock: how many conversation (non-frame) tokens arrived before it.

    Rows that have one keep it; rows still at the buffer's fill (-1: they
    arrived since the last eviction) get theirs counted on from the newest row
    that has one, in row order. That is exact because the rows are held in
    arrival order and every eviction keeps the newest row (the recent tail or
    the chunk it came in; ``InfMLLM`` refuses ``bias_frames=False`` where
    neither is kept). With no such row (a fresh stream's first eviction, or a
    memory saved before the clock existed) a row's clock is its stream index
    less the frames held before it: exact on a fresh stream, where nothing has
    left yet, and the stream index itself on an old memory (its frames carry
    no flag and count as conversation). In a stream without frames the clock
    is the stream index, so ages read on it are the default rule's.

    Args:
        talk: ``[batch, heads, rows]`` long, the clock so far (-1: not yet counted).
        frame: ``[batch, heads, rows]`` bool, the frame flag.
        seen: ``[batch, heads, rows]`` long, the rows' stream indices.

    Returns:
        ``[batch, heads, rows]`` long, every row counted.
    """
    talking = (~frame).to(torch.long)
    new = talk < 0
    # The newest counted row is the last counted one (arrival order): the clock goes on after it.
    rows = torch.arange(talk.shape[-1], device=talk.device)
    last = torch.where(~new, rows, -1).amax(dim=-1, keepdim=True)
    after_last = (talk + talking).gather(-1, last.clamp_min(0))
    before = torch.cumsum(talking * new, dim=-1) - talking * new  # conversation among the new rows before each
    framed = frame.to(torch.long)
    from_start = seen - (torch.cumsum(framed, dim=-1) - framed)  # no counted row: stream index less frames
    return torch.where(new, torch.where(last >= 0, after_last + before, from_start), talk)


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` over their mean along the tokens (a mean of 0 counts as the smallest normal float)."""
    return scores / scores.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def group_mean(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each token's value replaced by the mean over the tokens of its group.

    Args:
        values: ``[batch, heads, tokens]`` float scores.
        group: ``[batch, heads, tokens]`` integer group ids (any values: only equality counts).

    Returns:
        ``[batch, heads, tokens]``, the group means (per batch row and head).
    """
    # Dense ids over the groups present, so the sums stay as small as the tokens held however
    # large the ids have grown over a long stream.
    _, ids = torch.unique(group, return_inverse=True)
    size = int(ids.max().item()) + 1
    sums = values.new_zeros(*values.shape[:-1], size).scatter_add_(-1, ids, values)
    counts = values.new_zeros(*values.shape[:-1], size).scatter_add_(-1, ids, torch.ones_like(values))
    return (sums / counts.clamp_min(1.0)).gather(-1, ids)


#: name -> policy class; the node parameter, the bench CLI and the tests all use it.
POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Full, Window, StreamingLLM, H2O, InfMLLM)}


def make_policy(name: str, **knobs) -> Policy:
    """Build a policy by name, ignoring settings it does not use (e.g. ``bias`` for H2O)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(**{k: v for k, v in knobs.items() if k in cls.knobs and v is not None})
