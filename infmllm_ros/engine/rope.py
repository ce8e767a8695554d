"""Re-rotation of cached keys, so that positions inside the cache stay contiguous.

Keys are cached *after* RoPE, at the position they had when they were written.
When the cache evicts tokens, the survivors are moved to smaller positions
(closing the gaps) by rotating each key by ``delta = new - old``: a rotary
embedding is a rotation, so rotating by ``p`` and then by ``delta`` is the same
as rotating by ``p + delta`` (up to float error, which is why we rotate in
float32).

Multimodal RoPE (Qwen2-VL / Qwen2.5-VL) gives each frequency band the time,
height or width component of a 3-D position. We only ever shift all three
components of a token by the same ``delta``, which rotates every band by the
same angle per unit, i.e. it is the plain 1-D rotation below. Spatial offsets
inside a frame (height minus time, width minus time) are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RotationTable:
    """``cos`` and ``sin`` of ``d * inv_freq`` for every integer shift ``d`` in ``[-span, span]``.

    Re-rotation shifts keys by whole positions, so a compaction needs the angles of at most
    ``2 * span + 1`` shifts: looked up per key instead of computed per key and layer (the cos and sin
    of every held key in every layer took ~2% of a chunk's prefill on a CPU). Shapes ``[2 * span + 1,
    head_dim // 2]`` float32; row ``d + span`` is shift ``d``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    span: int

    @classmethod
    def build(cls, inv_freq: torch.Tensor, span: int, device: torch.device) -> "RotationTable":
        shifts = torch.arange(-span, span + 1, device=device, dtype=torch.float32)
        angles = shifts.unsqueeze(-1) * inv_freq.to(device=device, dtype=torch.float32)
        return cls(angles.cos(), angles.sin(), int(span))


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor,
             table: Optional[RotationTable] = None) -> torch.Tensor:
    """Rotate RoPE'd ``keys`` by ``delta`` positions.

    Args:
        keys: ``[batch, heads, tokens, head_dim]`` keys already rotated at their old positions.
        delta: ``[batch, heads, tokens]`` integer shift per key (new position minus old).
        inv_freq: ``[head_dim // 2]`` inverse frequencies of the model's rotary embedding.
        table: the angles of every shift up to ``table.span`` (one table serves every layer of a
            compaction); None: built here for ``delta``'s range.

    Returns:
        Keys of the same dtype as ``keys``, as if RoPE had been applied at ``old + delta`` (the
        half-split rotation of Llama and Qwen2: ``x1 cos - x2 sin``, ``x2 cos + x1 sin``).

    Raises:
        IndexError: a shift outside ``table``'s span.
    """
    half = keys.shape[-1] // 2
    if table is None:
        table = RotationTable.build(inv_freq, int(delta.abs().amax()) if delta.numel() else 0, keys.device)
    index = delta.reshape(-1).to(torch.long) + table.span
    cos = table.cos.index_select(0, index).view(*delta.shape, half)
    sin = table.sin.index_select(0, index).view(*delta.shape, half)
    k = keys.to(torch.float32)
    first, second = k[..., :half], k[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(keys.dtype)


@dataclass
class RopeSpec:
    """What the cache needs to know about a model's positions.

    ``components`` is 1 for ordinary RoPE and 3 for multimodal RoPE, where a
    token's position is (time, height, width).
    """

    inv_freq: torch.Tensor
    components: int = 1

    @classmethod
    def from_model(cls, model: torch.nn.Module, head_dim: int) -> "RopeSpec":
        """Find the decoder's rotary embedding and check we can re-rotate it."""
        rotary = _find_text_rotary(model)
        if rotary is None:
            raise ValueError(
                f"{type(model).__name__} has no rotary embedding we recognise (a module with `inv_freq`); "
                "the capped cache needs RoPE to keep positions contiguous"
            )
        inv_freq = rotary.inv_freq.detach().to(torch.float32)
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError(
                f"partial rotary embeddings are not supported (rotary dims {inv_freq.numel() * 2}, head_dim {head_dim})"
            )
        components = 3 if getattr(rotary, "mrope_section", None) is not None or _config_has_mrope(model) else 1
        return cls(inv_freq=inv_freq, components=components)


def _config_has_mrope(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    for source in (getattr(text_config, "rope_parameters", None), getattr(text_config, "rope_scaling", None)):
        if isinstance(source, dict) and source.get("mrope_section") is not None:
            return True
    return False


def _find_text_rotary(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    # The vision towers of VLMs have rotary embeddings of their own; the language
    # model's is the one whose class name does not mention vision.
    candidates = [
        m
        for name, m in model.named_modules()
        if hasattr(m, "inv_freq") and "vision" not in name.lower() and "visual" not in name.lower()
    ]
    return candidates[0] if candidates else None
