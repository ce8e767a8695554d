"""Plain data types shared by the engine, the frame encoders and the ROS node.

Nothing here imports ROS; stamps are float seconds (the node converts to and
from ``builtin_interfaces/Time``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch


def is_integer(value) -> bool:
    """An integer that is not a bool (Python, numpy): what a count or a length may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite real number that is not a bool (an int is one too)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


#: Kinds of chunk the stream knows about. ``frame`` chunks carry one camera
#: frame (visual tokens or an offline text observation); ``question`` and
#: ``answer`` chunks are the conversation, which stays in the stream.
CHUNK_KINDS = ("text", "frame", "question", "answer", "system")


@dataclass
class Chunk:
    """One unit appended to a stream: a frame's tokens, a prompt, an answer.

    Exactly one of ``input_ids`` (``[1, q]`` long) and ``inputs_embeds``
    (``[1, q, hidden]``) is set. ``rope_positions`` is only used by models with
    multimodal RoPE (Qwen2-VL / Qwen2.5-VL): ``[3, 1, q]`` positions that start
    at 0 for this chunk; the stream shifts them to where the chunk lands.
    """

    input_ids: Optional[torch.Tensor] = None
    inputs_embeds: Optional[torch.Tensor] = None
    rope_positions: Optional[torch.Tensor] = None
    kind: str = "text"
    camera: str = ""
    stamp: Optional[float] = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.inputs_embeds is None):
            raise ValueError("a Chunk needs exactly one of input_ids or inputs_embeds")
        for name in ("input_ids", "inputs_embeds", "rope_positions"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        for name in ("camera", "text"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"a Chunk's {name} must be a string, got {getattr(self, name)!r}")
        if self.stamp is not None and not is_finite_number(self.stamp):
            raise ValueError(f"a Chunk's stamp must be None or finite seconds, got {self.stamp!r}")
        if self.kind not in CHUNK_KINDS:
            raise ValueError(f"unknown chunk kind {self.kind!r}; expected one of {CHUNK_KINDS}")
        if self.input_ids is not None and self.input_ids.dim() == 1:
            self.input_ids = self.input_ids.unsqueeze(0)
        if self.input_ids is not None and (self.input_ids.dim() != 2 or self.input_ids.shape[0] != 1):
            raise ValueError(f"input_ids must be [1, q], got {tuple(self.input_ids.shape)}")
        if self.inputs_embeds is not None and (self.inputs_embeds.dim() != 3 or self.inputs_embeds.shape[0] != 1):
            raise ValueError(f"inputs_embeds must be [1, q, hidden], got {tuple(self.inputs_embeds.shape)}")
        if len(self) == 0:
            raise ValueError("empty chunk: nothing to append")
        if self.rope_positions is not None and self.rope_positions.shape[-1] != len(self):
            raise ValueError("rope_positions must have one column per token of the chunk")

    def __len__(self) -> int:
        t = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return int(t.shape[1])


class Cancelled(RuntimeError):
    """Raised by ``Stream.append_chunk`` / ``append_text`` when ``should_stop`` asked to stop.

    The check runs between pieces of at most ``max_chunk_tokens`` tokens, so a
    stop ends a long prefill within one forward pass. Pieces appended before
    the stop stay in the stream (they are whole, valid tokens); ``appended``
    says how many tokens of the chunk got in.
    """

    def __init__(self, appended: int, total: int):
        super().__init__(f"cancelled after {appended} of {total} tokens")
        self.appended = appended
        self.total = total


@dataclass
class AppendResult:
    """What one append did to the stream."""

    tokens: int
    evicted: int
    tokens_held: int
    pieces: int = 1  # an over-long chunk is split into this many pieces
    logits: Optional[torch.Tensor] = None  # float32, only when asked for: [q, vocab] ("all") or [1, vocab] ("last")


@dataclass
class Answer:
    """A generated answer and where in the stream it came from."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    latency_s: float
    oldest_stamp: Optional[float] = None
    newest_stamp: Optional[float] = None
    cancelled: bool = False
    first_logits: Optional[torch.Tensor] = None  # [vocab] after the prompt, only with ask(return_first_logits=True)


@dataclass
class StreamStats:
    """A snapshot of the stream's memory and history."""

    policy: str
    tokens_held: int  # per layer (all layers hold the same count)
    bytes_held: int  # keys + values of the tokens held, over all layers
    budget_tokens: int  # per layer, kept after each eviction (full: its capacity); 0 means unbounded
    budget_bytes: int  # the byte budget, or capacity x bytes per token; 0 means unbounded
    tokens_seen: int
    evictions: int  # tokens evicted, counted once per token position (not per layer/head)
    chunks_seen: int
    frames_seen: int
    next_position: int  # the RoPE position the next token gets
    oldest_stamp: Optional[float] = None
    newest_stamp: Optional[float] = None
    cameras: dict = field(default_factory=dict)  # camera -> frames seen
    capacity_tokens: int = 0  # per layer, the most ever held: budget + room for a chunk (and an answer); 0 unbounded
    bytes_reserved: int = 0  # bytes of the preallocated key/value buffers, all layers (never above budget_bytes)
