"""A transformers ``Cache`` whose layers never keep more than a budget of tokens.

The mechanics live here once for every policy:

* ``CappedLayer.update`` appends the new keys/values (and each token's stream
  index and RoPE position) and returns everything for this step's attention;
* ``CappedLayer.after_attention`` (called by the attention hook in
  ``attention.py`` with the step's queries) collects the statistics the policy
  needs, asks the policy for scores, and keeps the top ``budget`` tokens;
* ``CappedCache.make_room`` re-rotates the survivors' keys so that positions
  stay contiguous (``rope.py``) before the next chunk would need a position
  beyond ``budget + max_chunk``.

Storage stays sorted by stream index, so "the newest k tokens" are simply the
last k rows and the causal mask that transformers builds for the new chunk
(from ``get_seq_length``) stays right.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .policies import Policy, ScoreView
from .rope import RopeSpec, rerotate

# Queries are scored in blocks so that the float32 attention probabilities of a
# long chunk against a long cache never need more than this many elements.
_SCORE_BLOCK_ELEMENTS = 1 << 24


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
    """
    batch, q_heads, rows, dim = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    k = key.to(torch.float32)
    columns = torch.arange(tokens, device=key.device)
    out = torch.zeros(batch, kv_heads, tokens, dtype=torch.float32, device=key.device)
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, batch * q_heads * tokens))
    for start in range(0, rows, block):
        q = query[:, :, start : start + block].to(torch.float32)
        n = q.shape[2]
        q = q.view(batch, kv_heads, kv_groups, n, dim)
        logits = torch.einsum("bhgnd,bhtd->bhgnt", q, k) * scaling
        limit = causal_offset + start + torch.arange(n, device=key.device)
        hidden = columns.view(1, -1) > limit.view(-1, 1)
        logits.masked_fill_(hidden, float("-inf"))
        out += logits.softmax(dim=-1).sum(dim=(2, 3))
    return out


class CappedLayer(DynamicLayer):
    """One decoder layer's capped storage.

    Besides ``keys``/``values`` (``[batch, kv_heads, tokens, head_dim]``) it
    keeps, per stored token and KV head, ``seen`` (stream index) and
    ``positions`` (the RoPE position the key is rotated at; ``[..., 3]`` for
    multimodal RoPE), plus ``accumulated``: H2O's accumulated attention, or
    the value a policy that ``carries`` hands from one eviction to the next.
    """

    def __init__(self, owner: "CappedCache"):
        super().__init__()
        self.owner = owner
        self.seen: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None
        self.accumulated: Optional[torch.Tensor] = None
        self.incoming = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        device = key_states.device
        self.seen = torch.empty(batch, heads, 0, dtype=torch.long, device=device)
        self.positions = torch.empty(batch, heads, 0, self.owner.rope.components, dtype=torch.int32, device=device)
        self.accumulated = torch.empty(batch, heads, 0, dtype=torch.float32, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, new = key_states.shape[:3]
        seen, positions = self.owner.pending(new, key_states.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen = torch.cat([self.seen, seen.view(1, 1, new).expand(batch, heads, new)], dim=-1)
        self.positions = torch.cat(
            [self.positions, positions.view(1, 1, new, -1).expand(batch, heads, new, positions.shape[-1])], dim=-2
        )
        if self.owner.keeps_memory:
            self.accumulated = torch.cat(
                [self.accumulated, torch.zeros(batch, heads, new, dtype=torch.float32, device=key_states.device)],
                dim=-1,
            )
        self.incoming = new
        return self.keys, self.values

    def reset(self) -> None:
        self.seen = self.positions = self.accumulated = None
        self.incoming = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a capped cache cannot be cropped; reset the stream instead")

    @property
    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # -- eviction ---------------------------------------------------------------------------------------------

    def after_attention(self, query: torch.Tensor, scaling: float, attn_weights: Optional[torch.Tensor]) -> int:
        """Collect this step's statistics and evict down to the budget. Returns tokens evicted per head."""
        owner, policy = self.owner, self.owner.policy
        stored = self.keys.shape[-2]
        new = self.incoming
        kv_groups = query.shape[1] // self.keys.shape[1]

        if policy.needs == "accumulated":
            self.accumulated += self._column_sums(query, scaling, attn_weights, kv_groups, rows=new)

        if not policy.evicts or stored <= owner.budget:
            return 0
        if not policy.evicts_every_step and owner.decoding and stored <= owner.budget + owner.max_chunk:
            # Inf-MLLM evicts when a chunk arrives; while an answer is decoded the
            # cache may grow by at most one chunk.
            return 0

        view = ScoreView(seen=self.seen, new_tokens=new, budget=owner.budget, accumulated_attention=self.accumulated,
                         carried=self.accumulated if policy.carries else None)
        if policy.uses_groups:
            view.group = owner.group_of(self.seen)
        if policy.needs == "window":
            rows = min(new, getattr(policy, "retrieval_window", new))
            sums = self._column_sums(query[:, :, new - rows :], scaling, None, kv_groups, rows=rows)
            # Causal-mask normalisation: column t is visible to min(rows, stored - t) window queries.
            visible = (stored - torch.arange(stored, device=sums.device)).clamp(max=rows)
            view.window_attention = sums / (visible * kv_groups)
        scores = policy.score(view).to(torch.float32)
        if policy.carries:
            self.accumulated = policy.carry(view).to(torch.float32)
        if not policy.per_head:
            scores = scores.mean(dim=1, keepdim=True)
        keep = self._select(scores, new)
        self._gather(keep)
        return stored - owner.budget

    def _column_sums(self, query, scaling, attn_weights, kv_groups, rows):
        stored = self.keys.shape[-2]
        if attn_weights is not None and attn_weights.shape[-2] == query.shape[-2]:
            # Eager attention already computed the probabilities: reuse them.
            w = attn_weights[:, :, -rows:].to(torch.float32)
            batch, q_heads = w.shape[:2]
            return w.view(batch, q_heads // kv_groups, kv_groups, rows, stored).sum(dim=(2, 3))
        return column_attention(query, self.keys, scaling, kv_groups, causal_offset=stored - rows)

    def _select(self, scores: torch.Tensor, new: int) -> torch.Tensor:
        owner, policy = self.owner, self.owner.policy
        stored = scores.shape[-1]
        tail = policy.recent_tokens(owner.budget) + (new if policy.keep_new_chunk else 0)
        tail = min(tail, owner.budget - min(policy.sinks, owner.budget))
        forced = self.seen[:, : scores.shape[1]] < policy.sinks  # a new tensor: safe to write into
        if tail > 0:
            forced[..., stored - tail :] = True
        scores = scores.masked_fill(forced, math.inf)
        keep = scores.topk(owner.budget, dim=-1, sorted=False).indices
        keep, _ = keep.sort(dim=-1)
        return keep.expand(self.keys.shape[0], self.keys.shape[1], -1)

    def _gather(self, keep: torch.Tensor) -> None:
        dim = self.keys.shape[-1]
        self.keys = self.keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, dim))
        self.values = self.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, self.values.shape[-1]))
        self.seen = self.seen.gather(2, keep)
        self.positions = self.positions.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, self.positions.shape[-1]))
        if self.owner.keeps_memory:
            self.accumulated = self.accumulated.gather(2, keep)

    # -- contiguous positions ---------------------------------------------------------------------------------

    def compact(self) -> Optional[torch.Tensor]:
        """Close the position gaps left by evictions; returns the new extent (as a tensor) or None if empty."""
        if not self.is_initialized or self.keys.shape[-2] == 0:
            return None
        stored = self.keys.shape[-2]
        start = self.positions[..., 0].to(torch.long)
        if self.positions.shape[-1] == 1:
            # 1-D RoPE: storage is sorted, so the new position is the row index.
            new_start = torch.arange(stored, device=start.device).expand_as(start)
        else:
            new_start = _close_gaps(start, self.positions.to(torch.long).amax(dim=-1) - start + 1)
        delta = new_start - start
        self.keys = rerotate(self.keys, delta, self.owner.rope.inv_freq)
        self.positions = self.positions + delta.unsqueeze(-1).to(self.positions.dtype)
        return self.positions.amax() + 1


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


class CappedCache(Cache):
    """A ``Cache`` of ``CappedLayer``s sharing one policy and one budget.

    Args:
        num_layers: decoder layers of the model.
        policy: the eviction policy.
        budget: tokens kept per layer after each eviction (ignored by ``full``).
        max_chunk: largest chunk the stream appends at once; positions never
            exceed ``budget + max_chunk``.
        rope: the model's rotary embedding (for re-rotation).
        rerotate: keep positions contiguous. ``False`` lets positions grow as in
            a plain cache; only useful to show why re-rotation matters.
    """

    def __init__(
        self,
        num_layers: int,
        policy: Policy,
        budget: int,
        max_chunk: int,
        rope: RopeSpec,
        rerotate: bool = True,
    ):
        policy.check_budget(budget, max_chunk)
        self.policy = policy
        self.budget = budget
        self.max_chunk = max_chunk
        self.rope = rope
        self.rerotate_positions = rerotate
        self.decoding = False
        self.next_position = 0
        self.tokens_seen = 0
        self.evictions = 0
        self.keeps_memory = policy.needs == "accumulated" or policy.carries
        # stream index where each chunk starts (an answer's tokens join their question's chunk), for
        # policies that score whole chunks; pruned to the chunks still held
        self.group_starts: list[int] = []
        self._starts: Optional[torch.Tensor] = None
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        super().__init__(layers=[CappedLayer(self) for _ in range(num_layers)])

    # The stream announces each step's tokens before the forward pass; every layer reads the same.
    def begin_step(self, positions: torch.Tensor) -> None:
        """``positions``: ``[tokens, components]`` absolute RoPE positions of the tokens about to be appended."""
        new = positions.shape[0]
        seen = torch.arange(self.tokens_seen, self.tokens_seen + new, device=positions.device)
        self._pending = (seen, positions.to(torch.int32))
        if self.policy.uses_groups and not self.decoding:
            self.group_starts.append(self.tokens_seen)

    def abort_step(self) -> None:
        """Forget the step begun by :meth:`begin_step` (its forward failed); counters stay as they were."""
        self._pending = None

    def end_step(self, span: int) -> None:
        new = self._pending[0].numel()
        self.tokens_seen += new
        self.next_position += span
        self._pending = None

    def pending(self, new: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None or self._pending[0].numel() != new:
            raise RuntimeError(
                "the capped cache was updated outside Stream.append/ask (or with a different token count); "
                "drive the model through infmllm_ros.engine.Stream"
            )
        seen, positions = self._pending
        return seen.to(device), positions.to(device)

    def make_room(self, new_tokens: int) -> None:
        """Re-rotate so that ``new_tokens`` more positions fit inside ``budget + max_chunk``."""
        if not (self.policy.evicts and self.rerotate_positions):
            return
        if self.next_position + new_tokens <= self.budget + self.max_chunk:
            return
        extents = [e for e in (layer.compact() for layer in self.layers) if e is not None]
        if not extents:
            return
        if self.rope.components == 1:
            self.next_position = self.layers[0].keys.shape[-2]
        else:
            self.next_position = int(torch.stack([e.to(torch.long) for e in extents]).amax().item())

    def group_of(self, seen: torch.Tensor) -> torch.Tensor:
        """The chunk of each stream index in ``seen`` (any shape), as a number equal for tokens of one chunk."""
        if len(self.group_starts) > 2 * self.budget + 64:
            # Forget chunks no layer holds a token of (ids only need to tell chunks apart).
            held = torch.unique(torch.cat([layer.seen.reshape(-1).cpu() for layer in self.layers
                                           if layer.is_initialized]))
            starts = torch.tensor(self.group_starts)
            used = torch.unique(torch.searchsorted(starts, held, right=True) - 1)
            self.group_starts = starts[used].tolist() + ([] if used[-1] == len(starts) - 1 else [self.group_starts[-1]])
            self._starts = None
        if self._starts is None or self._starts.numel() != len(self.group_starts):
            self._starts = torch.tensor(self.group_starts, device=seen.device)
        return torch.searchsorted(self._starts.to(seen.device), seen, right=True) - 1

    def record_evictions(self, count: int) -> None:
        self.evictions += count

    @property
    def tokens_held(self) -> int:
        return self.layers[0].get_seq_length() if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.next_position = self.tokens_seen = self.evictions = 0
        self.group_starts, self._starts = [], None
        self.decoding = False
        self._pending = None
