"""A transformers ``Cache`` whose layers keep at most a budget of tokens, in static, preallocated buffers.

The mechanics live here once for every policy:

* every layer owns buffers of ``capacity`` rows, allocated once (keys, values
  and the named per-token buffers below); ``CappedLayer.update`` writes a
  step's new rows in place after the ``length`` rows held, and returns the held
  rows plus the new ones for this step's attention (a view, never a copy of
  the cache);
* ``CappedLayer.after_attention`` (called by the attention hook in
  ``attention.py`` with the step's queries) only *collects* the statistics the
  policy needs; nothing held changes during the forward pass;
* ``CappedCache.end_step`` then commits the step for every layer at once:
  scores, top-k, and an in-place compaction of the kept rows down to the
  budget. A forward pass that fails in any layer is rolled back by
  ``abort_step``: no layer has changed what it holds, so the stream stays as it
  was;
* ``CappedCache.make_room`` re-rotates the survivors' keys so that positions
  stay contiguous (``rope.py``) before the next step would need a position
  beyond ``budget + max_chunk``.

Rows stay sorted by stream index, so "the newest k tokens" are the last k rows
held and the causal mask that transformers builds for a chunk (from
``get_seq_length``/``get_mask_sizes``) stays right.

Static shapes: while a compiled decode step runs (``static_step``), each layer
returns its whole buffers and reports the held length as a 0-d tensor, as
transformers' ``StaticLayer`` does, so the step has one shape for the whole
answer; slots past the held length are hidden by the causal mask (query slot
``length`` sees slots ``<= length``).

Per-token buffers: besides keys and values, a layer keeps named buffers of one
entry per stored token and KV head, written, gathered and compacted together
with the keys. The cache always keeps ``seen`` (stream index) and
``positions`` (RoPE position; 3 components for multimodal RoPE); a policy asks
for more through :attr:`~.policies.Policy.token_buffers` (H2O's
``accumulated`` attention, Inf-MLLM's ``carried`` scores and ``chunk``
numbers) and reads them in ``score`` as ``view.buffers[name]``. New values a
policy sets in ``view.updates`` are written at the commit, before the
compaction, so they stay row for row with the keys too.

Latest observation per source (``keep_latest_per_source``): a robot's cameras
do not report at one rate. A busy camera's lines would push a motion-triggered
camera's one line out of a recency window (and out of an attention score: the
busy camera's lines attend to each other) within seconds, and "what did the
door camera see last?" would have no answer. With this option every source's
newest chunk is kept whatever the policy scores, like a ROS topic's last
message latched for late subscribers: below the sinks and the policy's own
recent tail in priority, above every score, whole chunks, newest first when they
do not all fit (once one does not fit, no older one is kept, and a chunk let go
loses its source on all its rows, so no line comes back cut to its last tokens).
The stream gives each frame's source id (``SOURCE`` buffer); the chunk numbers
say which chunk of a source is the newest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .kernels import cpu_kernels_status
from .policies import Policy, ScoreView, TokenBuffer
from .rope import RopeSpec, RotationTable, rerotate

# Queries are scored in blocks so that the float32 attention probabilities of a
# long chunk against a long cache never need more than this many elements.
_SCORE_BLOCK_ELEMENTS = 1 << 24
# A cache without a fixed capacity (``full`` without a budget) starts this small and doubles.
_INITIAL_ROWS = 512


def column_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, kv_groups: int, causal_offset: int
) -> torch.Tensor:
    """Attention probabilities of ``query`` rows over ``key`` columns, summed over rows and query heads.

    Args:
        query: ``[batch, q_heads, rows, head_dim]`` (RoPE applied).
        key: ``[batch, kv_heads, tokens, head_dim]`` (RoPE applied).
        scaling: the model's softmax scale.
        kv_groups: query heads per KV head (grouped-query attention).
        causal_offset: row ``i`` may see columns ``<= causal_offset + i``.

    Returns:
        ``[batch, kv_heads, tokens]`` float32 column sums.

    On a CPU with our kernels (:mod:`.kernels`) and float32 inputs, ``infmllm::window_column_sums`` computes
    the same sums without keeping every head's probabilities (the same scores by torch's GEMM; its own exp,
    relative error ~2e-7, and summation order); elsewhere the torch ops below.
    """
    batch, q_heads, rows, dim = query.shape
    if (query.device.type == "cpu" and key.device.type == "cpu" and query.dtype == key.dtype == torch.float32
            and key.stride(-1) == 1 and q_heads == key.shape[1] * kv_groups and not _tracing()
            and cpu_kernels_status()[0]):
        return torch.ops.infmllm.window_column_sums.default(query, key, float(scaling), int(causal_offset))
    kv_heads, tokens = key.shape[1], key.shape[2]
    k = key.to(torch.float32)
    columns = torch.arange(tokens, device=key.device)
    out = torch.zeros(batch, kv_heads, tokens, dtype=torch.float32, device=key.device)
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, batch * q_heads * tokens))
    for start in range(0, rows, block):
        # Scaled before the product: the queries are a twentieth of the logits' size.
        q = query[:, :, start : start + block].to(torch.float32) * scaling
        n = q.shape[2]
        q = q.view(batch, kv_heads, kv_groups, n, dim)
        logits = torch.einsum("bhgnd,bhtd->bhgnt", q, k)
        # Only columns after the block's first row can be hidden from a row: mask that corner alone.
        first_hidden = causal_offset + start + 1
        if first_hidden < tokens:
            limit = causal_offset + start + torch.arange(n, device=key.device)
            hidden = columns[first_hidden:].view(1, -1) > limit.view(-1, 1)
            logits[..., first_hidden:].masked_fill_(hidden, float("-inf"))
        out += logits.softmax(dim=-1).sum(dim=(2, 3))
    return out


@dataclass
class _Selection:
    """What one layer keeps at the end of a step: sorted row indices ``[batch, heads, kept]``, and new
    values ``[batch, heads, stored]`` for the policy's per-token buffers (``ScoreView.updates``)."""

    keep: torch.Tensor
    updates: dict[str, torch.Tensor]


def latest_chunks(source: torch.Tensor, chunk: torch.Tensor, forced: torch.Tensor,
                  room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every source's newest chunk to keep beside ``forced``: whole chunks, newest first.

    Each row of the last dimension is one held token, in stream order, so chunk numbers never decrease
    along it. A source's newest chunk is the largest chunk number among its rows; the rows of such a
    chunk that ``forced`` does not keep already are candidates, and a chunk is kept when its candidate
    rows and those of every newer candidate chunk fit in ``room``.

    Args:
        source: ``[..., rows]`` integer source ids (-1: none, never kept).
        chunk: ``[..., rows]`` chunk numbers, non-decreasing along the rows.
        forced: ``[..., rows]`` bool, rows kept anyway (they take no room here).
        room: rows available per leading index.

    Returns:
        ``(chosen, released)``, both ``[..., rows]`` bool: the rows kept, and every row of the chunks
        that did not fit (those ``forced`` keeps for now included). Newest first means a prefix: once a
        chunk does not fit, no older chunk is kept either.
    """
    # Dense ids over the sources present (ids are hashes of camera names); sized by how many there are,
    # since rows of different heads and layers may hold more distinct values than one row count.
    values, ids = torch.unique(source, return_inverse=True)
    newest = chunk.new_full((*source.shape[:-1], values.numel()), -1).scatter_reduce_(-1, ids, chunk, reduce="amax")
    latest = (source >= 0) & (chunk == newest.gather(-1, ids))
    pinned = latest & ~forced
    # Rows are in stream order, so the pinned rows at or after a chunk's first pinned row are its own and
    # those of every newer pinned chunk: the chunk fits, with all newer ones, when that count fits the room.
    after = pinned.long().flip(-1).cumsum(-1).flip(-1) * pinned
    # A chunk's pinned rows are contiguous (forced rows are a prefix of sinks and a suffix of the tail):
    # each row reads the count at the first row of its run, found as the running max of run starts.
    same_chunk = F.pad(chunk[..., 1:] == chunk[..., :-1], (1, 0))
    rows = torch.arange(source.shape[-1], device=source.device).expand_as(source)
    starts = pinned & ~(F.pad(pinned[..., :-1], (1, 0)) & same_chunk)
    first = torch.where(starts, rows, 0).cummax(-1).values
    chosen = pinned & (after.gather(-1, first) <= room)
    # A chunk let go loses its source on every row, the ones the tail still keeps too: once they leave
    # the tail they must not come back as the camera's newest line, cut to its last tokens.
    run = (latest & ~(F.pad(latest[..., :-1], (1, 0)) & same_chunk)).long().cumsum(-1).sub_(1).clamp_(min=0)
    let_go = torch.zeros_like(run).scatter_reduce_(-1, run, (pinned & ~chosen).long(), reduce="amax")
    return chosen, latest & let_go.gather(-1, run).bool()


class CappedLayer(CacheLayerMixin):
    """One decoder layer's capped storage: preallocated buffers written in place.

    Attributes:
        keys, values: ``[batch, kv_heads, capacity, head_dim]`` buffers; the
            first ``owner.length`` rows are held.
        buffers: named per-token buffers ``[batch, kv_heads, capacity, *trailing]``
            (``seen``, ``positions`` and the policy's own), kept row for row
            with the keys.
    """

    is_sliding = False
    is_croppable = False

    @property
    def is_compileable(self) -> bool:
        # Only a static step has static shapes. Saying so makes transformers build an explicit
        # mask for a one-token query; an eager step keeps sdpa's faster mask-free GQA path.
        return self.owner.static_step

    def __init__(self, owner: "CappedCache"):
        super().__init__()
        self.owner = owner
        self.buffers: dict[str, torch.Tensor] = {}
        self._stats: dict[str, torch.Tensor] = {}  # this step's statistics, applied at commit

    # -- storage ----------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Allocated rows (the buffers' token dimension)."""
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.device = key_states.device
        self._allocate(key_states.shape[:2], key_states.shape[-1], value_states.shape[-1], key_states.dtype,
                       self.owner.initial_rows())
        self.is_initialized = True

    def _allocate(self, lead, k_dim: int, v_dim: int, dtype: torch.dtype, rows: int) -> None:
        batch, heads = lead
        old_rows, held = self.rows, self.owner.length
        # Zeros, not empty: slots past the held length are masked out, but a NaN there would
        # still poison a masked softmax-times-value product in the static decode step.
        keys = torch.zeros(batch, heads, rows, k_dim, dtype=dtype, device=self.device)
        values = torch.zeros(batch, heads, rows, v_dim, dtype=dtype, device=self.device)
        buffers = {name: torch.full((batch, heads, rows, *spec.trailing), spec.fill, dtype=spec.dtype,
                                    device=self.device)
                   for name, spec in self.owner.token_buffers.items()}
        if old_rows and held:
            keys[:, :, :held] = self.keys[:, :, :held]
            values[:, :, :held] = self.values[:, :, :held]
            for name, buf in buffers.items():
                buf[:, :, :held] = self.buffers[name][:, :, :held]
        self.keys, self.values, self.buffers = keys, values, buffers
        if self.owner.fixed_capacity and not _tracing():
            # Fixed addresses for CUDA graphs (as transformers' StaticLayer does).
            for t in (self.keys, self.values, *self.buffers.values()):
                torch._dynamo.mark_static_address(t)

    def ensure_rows(self, needed: int) -> None:
        """Grow (doubling) a cache without a fixed capacity so that ``needed`` rows fit."""
        if needed <= self.rows:
            return
        if self.owner.fixed_capacity:
            raise RuntimeError(f"capped cache overflow: {needed} rows needed, {self.rows} allocated "
                               "(the stream must not append past the capacity)")
        rows = max(needed, 2 * self.rows)
        if self.owner.max_rows:
            rows = min(rows, self.owner.max_rows)
        if rows < needed:
            raise RuntimeError(f"cache overflow: {needed} rows needed, at most {self.owner.max_rows} allowed")
        self._allocate(self.keys.shape[:2], self.keys.shape[-1], self.values.shape[-1], self.keys.dtype, rows)

    def held(self, name: str, n: Optional[int] = None) -> torch.Tensor:
        """The first ``n`` (default: held) rows of ``keys``, ``values`` or a named buffer (a view)."""
        n = self.owner.length if n is None else n
        if name == "keys":
            return self.keys[:, :, :n]
        if name == "values":
            return self.values[:, :, :n]
        return self.buffers[name][:, :, :n]

    @property
    def seen(self) -> Optional[torch.Tensor]:
        """Stream index of each held token, ``[batch, kv_heads, held]`` (a view)."""
        return self.held("seen") if self.is_initialized else None

    @property
    def positions(self) -> Optional[torch.Tensor]:
        """RoPE position of each held key, ``[batch, kv_heads, held, components]`` (a view)."""
        return self.held("positions") if self.is_initialized else None

    def _all(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, **self.buffers}

    # -- the transformers layer API ---------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        new = key_states.shape[-2]
        step = owner.pending(new, key_states.device)
        if owner.static_step:
            # Compiled decode: one token at the slot given by a tensor, whole buffers returned (static shapes).
            slot = step.slot
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            for name, value in step.values.items():
                self.buffers[name].index_copy_(2, slot, value.expand(*self.keys.shape[:2], *value.shape))
            return self.keys, self.values
        start = owner.length
        self.ensure_rows(start + new)
        end = start + new
        # narrow + copy_ (copy_ broadcasts a step value over batch and heads): the same copies as slice
        # assignment, a third of the calls (a decode step makes these for every layer)
        self.keys.narrow(2, start, new).copy_(key_states)
        self.values.narrow(2, start, new).copy_(value_states)
        for name, spec in owner.token_buffers.items():
            value = step.values.get(name)
            target = self.buffers[name].narrow(2, start, new)
            if value is None:
                target.fill_(spec.fill)
            else:
                target.copy_(value)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query: Union[int, torch.Tensor] = 0, *args) -> tuple[int, int]:
        """``(kv_length, kv_offset)``; takes the query length (5.2x) or the cache positions (older 5.x)."""
        if self.owner.static_step:
            return self.rows, 0
        q = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self.owner.length + q, 0

    def get_seq_length(self, *args) -> Union[int, torch.Tensor]:
        if self.owner.static_step:
            return self.owner.length_tensor
        return self.owner.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.owner.capacity or -1

    get_max_cache_shape = get_max_length  # the name before transformers 5.2x

    def reset(self) -> None:
        """Forget what is held; the buffers stay allocated (their addresses are part of a compiled step)."""
        self._stats = {}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a capped cache cannot be cropped; reset the stream instead")

    def offload(self):  # pragma: no cover - not used by the stream
        raise NotImplementedError("a capped cache keeps its buffers on one device")

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (not the whole allocation: see ``reserved_bytes``)."""
        if not self.is_initialized:
            return 0
        n = self.owner.length
        per_row = self.keys[0, :, 0].numel() * self.keys.element_size()
        per_row += self.values[0, :, 0].numel() * self.values.element_size()
        return n * per_row * self.keys.shape[0]

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated for keys and values (the memory the layer takes)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # -- statistics and eviction -------------------------------------------------------------------------------

    def after_attention(self, query: torch.Tensor, scaling: float, attn_weights: Optional[torch.Tensor]) -> None:
        """Collect this step's statistics (nothing held changes until the step is committed)."""
        owner, policy = self.owner, self.owner.policy
        if not owner.wants_statistics():
            return
        stored = owner.length + owner.incoming
        new = owner.incoming
        kv_groups = query.shape[1] // self.keys.shape[1]
        if policy.needs == "accumulated":
            self._stats["accumulated"] = self._column_sums(query, scaling, attn_weights, kv_groups, new, stored)
        if policy.needs == "window":  # (it evicts: wants_statistics)
            rows = min(new, getattr(policy, "retrieval_window", new))
            sums = self._column_sums(query[:, :, new - rows:], scaling, None, kv_groups, rows, stored)
            # Causal-mask normalisation: column t is visible to min(rows, stored - t) window queries.
            visible = (stored - torch.arange(stored, device=sums.device)).clamp(max=rows)
            self._stats["window"] = sums / (visible * kv_groups)

    def _column_sums(self, query, scaling, attn_weights, kv_groups, rows, stored):
        if attn_weights is not None and attn_weights.shape[-2] == query.shape[-2]:
            # Eager attention already computed the probabilities: reuse them.
            w = attn_weights[:, :, -rows:, :stored].to(torch.float32)
            batch, q_heads = w.shape[:2]
            return w.view(batch, q_heads // kv_groups, kv_groups, rows, stored).sum(dim=(2, 3))
        return column_attention(query, self.held("keys", stored), scaling, kv_groups, causal_offset=stored - rows)

    def select(self, stored: int, new: int,
               pins: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Optional[_Selection]:
        """Phase 1 of a commit: which rows to keep (nothing is changed). None: keep everything.

        ``pins``: this layer's share of :meth:`CappedCache.latest_pins` (every row kept whatever the score,
        and the source buffer with the chunks let go marked -1), or None.
        """
        owner, policy = self.owner, self.owner.policy
        stats, self._stats = self._stats, {}
        if "accumulated" in stats:
            self.held("accumulated", stored).add_(stats["accumulated"])
        if not owner.will_evict(stored):
            return None
        view = ScoreView(seen=self.held("seen", stored), new_tokens=new, budget=owner.budget,
                         buffers={name: self.held(name, stored) for name in owner.policy.token_buffers},
                         window_attention=stats.get("window"))
        if "accumulated" in view.buffers:
            view.accumulated_attention = view.buffers["accumulated"]
        scores = policy.score(view).to(torch.float32)
        if not policy.per_head:
            scores = scores.mean(dim=1, keepdim=True)
        return _Selection(self._top(scores, new, view.seen, view.updates, pins), view.updates)

    def _top(self, scores: torch.Tensor, new: int, seen: torch.Tensor, updates: dict,
             pins: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        owner = self.owner
        if pins is None:
            forced, _ = owner.forced_rows(seen[:, :scores.shape[1]], new)
        else:
            forced, updates[owner.SOURCE] = pins
        scores = scores.masked_fill(forced, math.inf)
        keep = scores.topk(owner.budget, dim=-1, sorted=False).indices
        keep, _ = keep.sort(dim=-1)
        return keep.expand(self.keys.shape[0], self.keys.shape[1], -1)

    def apply(self, selection: _Selection, stored: int) -> None:
        """Phase 2 of a commit: move the kept rows to the front, in place, every buffer alike."""
        for name, value in selection.updates.items():
            self.held(name, stored).copy_(value)
        keep = selection.keep
        kept = keep.shape[-1]
        # Rows before the first evicted one stay where they are: move only the rest.
        moved = keep != torch.arange(kept, device=keep.device)
        if not bool(moved.any()):
            return  # the evicted rows were all at the end: nothing moves
        first_moved = torch.where(moved.any(dim=-1), moved.to(torch.int8).argmax(dim=-1), kept)
        first = int(first_moved.min())
        keep = keep[..., first:]
        start = keep[..., :1]
        if bool((keep == start + torch.arange(kept - first, device=keep.device)).all()) and \
                bool((start == start.flatten()[0]).all()):
            # One block of rows for every head (StreamingLLM, window, a decode step's single
            # eviction): a plain copy, not a gather. The source overlaps the target: clone it first.
            src = int(start.flatten()[0])
            for buf in self._all().values():
                buf[:, :, first:kept] = buf[:, :, src:src + kept - first].clone()
            return
        # Each head keeps its own rows: select them from the buffers seen as one list of rows
        # (index_select copies whole rows; a gather indexes every element, 7x slower here).
        batch, heads, rows = self.keys.shape[:3]
        flat = (keep + torch.arange(batch * heads, device=keep.device).view(batch, heads, 1) * rows).reshape(-1)
        for buf in self._all().values():
            picked = buf.view(batch * heads * rows, *buf.shape[3:]).index_select(0, flat)
            buf[:, :, first:kept] = picked.view(batch, heads, kept - first, *buf.shape[3:])

    def discard_step(self) -> None:
        self._stats = {}

    # -- contiguous positions ---------------------------------------------------------------------------------

    def compact(self, table: Optional[RotationTable] = None) -> Optional[torch.Tensor]:
        """Close the position gaps left by evictions; returns the new extent (as a tensor) or None if empty.

        ``table``: the rotation angles of every shift the compaction can need (see :meth:`CappedCache.make_room`).
        """
        stored = self.owner.length
        if not self.is_initialized or stored == 0:
            return None
        positions = self.held("positions")
        start = positions[..., 0].to(torch.long)
        if positions.shape[-1] == 1:
            # 1-D RoPE: storage is sorted, so the new position is the row index.
            new_start = torch.arange(stored, device=start.device).expand_as(start)
        else:
            new_start = _close_gaps(start, positions.to(torch.long).amax(dim=-1) - start + 1)
        delta = new_start - start
        keys = self.held("keys")
        keys.copy_(rerotate(keys, delta, self.owner.rope.inv_freq, table))
        positions.add_(delta.unsqueeze(-1).to(positions.dtype))
        return positions.amax() + 1


def answer_room(policy: Policy, max_chunk: int) -> int:
    """Tokens an answer may add to the cache before an eviction: one chunk for policies that evict
    only when a chunk arrives (Inf-MLLM), none for those that evict at every step or never."""
    return max_chunk if policy.evicts and not policy.evicts_every_step else 0


def _tracing() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def _close_gaps(start: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """New start positions when every position no kept token covers is removed.

    Token ``i`` covers ``[start_i, start_i + extent_i)`` (for multimodal RoPE a
    frame's patch token covers its time position up to its largest height or
    width position). Shapes ``[batch, heads, tokens]``.
    """
    length = int((start + extent).amax().item())
    diff = torch.zeros(*start.shape[:-1], length + 1, dtype=torch.long, device=start.device)
    diff.scatter_add_(-1, start, torch.ones_like(start))
    diff.scatter_add_(-1, start + extent, -torch.ones_like(start))
    covered = diff.cumsum(-1)[..., :length] > 0
    removed_before = torch.cumsum((~covered).long(), dim=-1) - (~covered).long()
    return start - removed_before.gather(-1, start)


@dataclass
class _Step:
    """The tokens of the step in flight: per-token values (``[tokens, *trailing]``) and, in a static step, the slot."""

    new: int
    values: dict[str, torch.Tensor]
    slot: Optional[torch.Tensor] = None


class CappedCache(Cache):
    """A ``Cache`` of ``CappedLayer``s sharing one policy, one budget and one held length.

    Args:
        num_layers: decoder layers of the model.
        policy: the eviction policy.
        budget: tokens each layer keeps after an eviction (``full`` never evicts).
        max_chunk: largest step the stream appends at once; positions never
            exceed ``budget + max_chunk``.
        rope: the model's rotary embedding (for re-rotation).
        rerotate: keep positions contiguous. ``False`` lets positions grow as in
            a plain cache; only useful to show why re-rotation matters.
        capacity: rows allocated per layer, the most tokens ever held. Default
            for an evicting policy: ``budget + answer_room + max_chunk`` (the
            budget, what an answer may add while decoding, and the next step);
            for ``full`` no fixed capacity (buffers double as needed, up to
            ``max_rows`` when set).
        max_rows: ``full`` without a capacity: never allocate more rows than this (0: no limit).
        keep_latest_per_source: keep every source's newest chunk through evictions (see the module
            docstring); the stream passes each step's source id as the ``SOURCE`` buffer's value.

    All layers hold the same number of tokens (``length``): every eviction keeps
    exactly ``budget`` per layer and head.

    A policy that asks for a per-token buffer named :attr:`CHUNK` gets each
    token's chunk number in it, counted by the cache: every step begun outside
    decoding starts a chunk unless it continues one (the pieces of a chunk the
    stream split at ``max_chunk`` share its number), and an answer's tokens and
    its turn end join their question's chunk.
    """

    #: name of the per-token buffer the cache fills with chunk numbers (for policies that score chunks)
    CHUNK = "chunk"
    #: name of the per-token buffer of source ids (``keep_latest_per_source``; -1: no source, never pinned)
    SOURCE = "source"

    def __init__(
        self,
        num_layers: int,
        policy: Policy,
        budget: int,
        max_chunk: int,
        rope: RopeSpec,
        rerotate: bool = True,
        capacity: Optional[int] = None,
        max_rows: int = 0,
        keep_latest_per_source: bool = False,
    ):
        policy.check_budget(budget, max_chunk)
        self.policy = policy
        self.budget = budget
        self.max_chunk = max_chunk
        self.rope = rope
        self.rerotate_positions = rerotate
        #: tokens an answer may add without an eviction (Inf-MLLM: one chunk; H2O & co. evict every step)
        self.answer_room = answer_room(policy, max_chunk)
        if capacity is None and policy.evicts:
            capacity = budget + self.answer_room + max_chunk
        if policy.evicts and capacity < budget + self.answer_room + 1:
            raise ValueError(f"capacity {capacity} leaves no room beside a budget of {budget} tokens")
        self.capacity: Optional[int] = capacity
        self.max_rows = max_rows
        #: name -> spec of every per-token buffer: the cache's own and the policy's.
        self.token_buffers: dict[str, TokenBuffer] = {
            "seen": TokenBuffer(torch.long),
            "positions": TokenBuffer(torch.int32, (rope.components,)),
            **policy.token_buffers,
        }
        self.keep_latest_per_source = bool(keep_latest_per_source)
        #: the buffers keep_latest_per_source adds beside the policy's (a state saved without it lacks them)
        self.latest_buffers: frozenset[str] = frozenset()
        if self.keep_latest_per_source:
            self.latest_buffers = frozenset({self.SOURCE, self.CHUNK} - set(self.token_buffers))
            for name in self.latest_buffers:
                self.token_buffers[name] = TokenBuffer(torch.long, fill=-1)
        self.decoding = False
        self.static_step = False
        self.length = 0
        self.length_tensor: Optional[torch.Tensor] = None
        self.incoming = 0
        self.next_position = 0
        self.tokens_seen = 0
        self.evictions = 0
        #: chunks begun so far (the next chunk's number); counted only for a policy with a CHUNK buffer
        self.chunks_begun = 0
        self._chunks_undo = 0  # chunks_begun before the step in flight (restored if it fails)
        self._pending: Optional[_Step] = None
        super().__init__(layers=[CappedLayer(self) for _ in range(num_layers)])

    @property
    def fixed_capacity(self) -> bool:
        return self.capacity is not None

    def initial_rows(self) -> int:
        if self.capacity is not None:
            return self.capacity
        rows = max(_INITIAL_ROWS, 2 * self.max_chunk)
        return min(rows, self.max_rows) if self.max_rows else rows

    def will_evict(self, stored: int) -> bool:
        """Whether a step that leaves ``stored`` rows ends with an eviction."""
        policy = self.policy
        if not policy.evicts or stored <= self.budget:
            return False
        if not policy.evicts_every_step and self.decoding and stored <= self.budget + self.answer_room:
            # Inf-MLLM evicts when a chunk arrives; while an answer is decoded the cache
            # grows into its answer room (one chunk), and evicts only once that is used up.
            return False
        return True

    def wants_statistics(self) -> bool:
        """Whether the step in flight collects attention statistics (:meth:`CappedLayer.after_attention` does
        anything): always for a policy that accumulates them (H2O), for Inf-MLLM's window only when the step
        ends with an eviction; never for the others."""
        needs = self.policy.needs
        return needs == "accumulated" or (needs == "window" and self.will_evict(self.length + self.incoming))

    def forced_rows(self, seen: torch.Tensor, new: int) -> tuple[torch.Tensor, int]:
        """Rows an eviction keeps whatever the policy scores, and the room left beside them for pins.

        Args:
            seen: ``[..., heads, stored]`` stream indices of the rows held once the step's ``new`` tokens
                arrived (``heads`` is 1 for a policy that selects for all heads alike).
            new: tokens of the step in flight.

        Returns:
            ``(forced, room)``: a new bool tensor shaped like ``seen`` (the sinks, the policy's recent tail
            and, for a policy that keeps it, the new chunk) and how many further rows per head the
            budget has beside them.
        """
        policy = self.policy
        stored = seen.shape[-1]
        sinks = min(policy.sinks, self.budget)
        tail = min(policy.recent_tokens(self.budget) + (new if policy.keep_new_chunk else 0), self.budget - sinks)
        forced = seen < policy.sinks  # a new tensor: safe to write into
        if tail > 0:
            forced[..., stored - tail:] = True
        # An eviction only happens past the budget, so the sinks (the oldest rows) and the tail (the
        # newest) never overlap: the room is known without a host sync.
        return forced, self.budget - sinks - tail

    def latest_pins(self, stored: int, new: int) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, the rows ``keep_latest_per_source`` keeps in the eviction that ends this step.

        Computed for every layer at once (one set of tensor operations on the layers' buffers
        stacked, instead of one per layer: at an eviction per decoded token, per-layer calls cost
        StreamingLLM and H2O 10-20% of their decode speed; docs/benchmarks.md section 10c).

        Returns:
            None when there is nothing to keep (no room beside the forced rows), else one
            ``(kept, sources)`` per layer: ``kept`` ``[batch, heads, stored]`` bool, the forced rows
            (:meth:`forced_rows`) and those of each source's newest chunk that fit (see
            :func:`latest_chunks`), and ``sources`` the layer's source ids with the chunks that did not
            fit set to -1 (let go for good).
        """
        heads = self.layers[0].keys.shape[1] if self.policy.per_head else 1

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([layer.held(name, stored)[:, :heads] for layer in self.layers])

        forced, room = self.forced_rows(stacked("seen"), new)
        if room <= 0:
            return None
        source = stacked(self.SOURCE)
        chosen, released = latest_chunks(source, stacked(self.CHUNK), forced, room)
        sources = source.masked_fill(released, -1)
        return list(zip((forced | chosen).unbind(0), sources.unbind(0)))

    # -- steps: the stream announces each step's tokens before the forward pass; every layer reads the same ------

    def begin_step(self, positions: torch.Tensor, values: Optional[dict[str, torch.Tensor]] = None,
                   continues: bool = False) -> None:
        """Announce the tokens about to be appended.

        Args:
            positions: ``[tokens, components]`` absolute RoPE positions.
            values: optional per-token values ``[tokens, *trailing]`` for named
                buffers (those not given start at their spec's ``fill``).
            continues: the step is a further piece of the chunk the previous step began (same chunk number).
        """
        new = positions.shape[0]
        if self.capacity is not None and self.length + new > self.capacity:
            raise RuntimeError(f"a step of {new} tokens does not fit: {self.length} held, capacity {self.capacity}")
        seen = torch.arange(self.tokens_seen, self.tokens_seen + new, device=positions.device)
        step_values = {"seen": seen, "positions": positions.to(torch.int32)}
        self._chunks_undo = self.chunks_begun
        if self.CHUNK in self.token_buffers:
            if not (self.decoding or continues):
                self.chunks_begun += 1
            step_values[self.CHUNK] = torch.full((new,), self.chunks_begun - 1, dtype=torch.long,
                                                 device=positions.device)
        step_values.update(values or {})
        unknown = set(step_values) - set(self.token_buffers)
        if unknown:
            raise ValueError(f"no per-token buffer named {sorted(unknown)}; known: {sorted(self.token_buffers)}")
        self._pending = _Step(new, step_values)
        self.incoming = new

    def begin_static_step(self, step: "_Step") -> None:
        """Announce a compiled decode step whose inputs were written into persistent tensors (``step``)."""
        if self.CHUNK in step.values:
            # A decoded token joins the chunk of the question it answers.
            step.values[self.CHUNK].fill_(self.chunks_begun - 1)
        self._chunks_undo = self.chunks_begun
        self._pending = step
        self.incoming = 1
        self.static_step = True

    def abort_step(self) -> None:
        """Forget the step begun by :meth:`begin_step` (its forward failed): no layer changed what it holds."""
        self._pending = None
        self.incoming = 0
        self.static_step = False
        self.chunks_begun = self._chunks_undo
        for layer in self.layers:
            layer.discard_step()

    def end_step(self, span: int) -> int:
        """Commit the step in every layer (evicting down to the budget); returns tokens evicted per head."""
        new = self._pending.new
        stored = self.length + new
        # may fail: nothing changed yet
        pins = self.latest_pins(stored, new) if self.keep_latest_per_source and self.will_evict(stored) else None
        selections = [layer.select(stored, new, None if pins is None else pins[i])
                      for i, layer in enumerate(self.layers)]
        self.static_step = False
        kept = stored
        for layer, selection in zip(self.layers, selections):
            if selection is not None:
                layer.apply(selection, stored)
                kept = selection.keep.shape[-1]
        self._set_length(kept)
        self.tokens_seen += new
        self.next_position += span
        self._pending = None
        self.incoming = 0
        evicted = stored - kept
        self.evictions += evicted
        return evicted

    def _set_length(self, n: int) -> None:
        self.length = n
        if self.length_tensor is not None:
            self.length_tensor.fill_(n)

    def pending(self, new: int, device: torch.device) -> _Step:
        step = self._pending
        if step is None or step.new != new:
            raise RuntimeError(
                "the capped cache was updated outside Stream.append/ask (or with a different token count); "
                "drive the model through infmllm_ros.engine.Stream"
            )
        if not self.static_step and any(v.device != device for v in step.values.values()):
            step.values = {k: v.to(device) for k, v in step.values.items()}
        return step

    def static_inputs(self, device: torch.device) -> _Step:
        """Persistent tensors a compiled decode step reads (fixed addresses): slot, stream index, positions."""
        if self.length_tensor is None or self.length_tensor.device != device:
            self.length_tensor = torch.tensor(self.length, dtype=torch.long, device=device)
        values = {"seen": torch.zeros(1, dtype=torch.long, device=device),
                  "positions": torch.zeros(1, self.rope.components, dtype=torch.int32, device=device)}
        for name, spec in self.token_buffers.items():
            if name not in values:
                values[name] = torch.full((1, *spec.trailing), spec.fill, dtype=spec.dtype, device=device)
        return _Step(1, values, slot=self.length_tensor.view(1))

    def make_room(self, new_tokens: int) -> None:
        """Re-rotate so that ``new_tokens`` more positions fit inside ``budget + max_chunk``."""
        if not (self.policy.evicts and self.rerotate_positions):
            return
        if self.next_position + new_tokens <= self.budget + self.max_chunk:
            return
        first = next((layer for layer in self.layers if layer.is_initialized), None)
        # Every held position is below next_position, so no key moves by more than that: one table for all layers.
        table = None if first is None else RotationTable.build(self.rope.inv_freq, self.next_position, first.keys.device)
        extents = [e for e in (layer.compact(table) for layer in self.layers) if e is not None]
        if not extents:
            return
        if self.rope.components == 1:
            self.next_position = self.length
        else:
            self.next_position = int(torch.stack([e.to(torch.long) for e in extents]).amax().item())

    @property
    def tokens_held(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held, all layers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated for keys and values, all layers (what the cache takes in memory)."""
        return sum(layer.reserved_bytes for layer in self.layers)

    def reset(self) -> None:
        """Forget every token; buffers stay allocated (a compiled decode step keeps their addresses)."""
        for layer in self.layers:
            layer.reset()
        self._set_length(0)
        self.next_position = self.tokens_seen = self.evictions = self.chunks_begun = self._chunks_undo = 0
        self.decoding = self.static_step = False
        self._pending = None
        self.incoming = 0
