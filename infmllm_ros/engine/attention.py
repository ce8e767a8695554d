"""The one hook: an attention function that lets the capped cache see each step's queries.

transformers dispatches attention through ``AttentionInterface``. We register
``infmllm_<base>`` for the model's own implementation (sdpa, eager, flash):
it calls the base function unchanged and then, only while a ``CappedCache`` is
active in this context and only for the decoder's attention modules, hands the
queries (already rotated) to the cache layer so it can score and evict. The
vision tower and any other model in the process see the plain base function.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from typing import Callable, Iterator, Optional

import torch

from .cache import CappedCache
from .kernels import cpu_kernels_status

_ACTIVE: contextvars.ContextVar[Optional[CappedCache]] = contextvars.ContextVar("infmllm_active_cache", default=None)
_PREFIX = "infmllm_"


@contextlib.contextmanager
def active(cache: CappedCache) -> Iterator[None]:
    """Make ``cache`` the one the hook reports to, for the forward passes inside the block."""
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _base_function(module: torch.nn.Module, base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    # Eager attention lives in each model's own file.
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"no eager_attention_forward next to {type(module).__name__}")
    return fn


# Keyword arguments transformers passes to an attention function that do not change sdpa's result for one
# query token with no mask; any other one that is set (a position bias, sinks, a softcap, ...) keeps sdpa.
_KWARGS_THE_KERNEL_HONOURS = frozenset({"dropout", "scaling", "position_ids", "use_cache", "cache_position",
                                        "output_attentions", "is_causal", "past_key_values", "past_key_value"})


def decode_kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                           kwargs: dict) -> bool:
    """Whether ``infmllm::decode_attention`` computes what sdpa would here: one float32 query token on the
    CPU over every cached key (no mask, no dropout, no other set keyword than those it honours), head_dim
    64 everywhere, shapes the kernel takes, inside a stream's step (not a plain model call, not a compiled
    graph)."""
    return (attention_mask is None and query.shape[2] == 1 and not kwargs.get("dropout")
            and all(v is None or name in _KWARGS_THE_KERNEL_HONOURS for name, v in kwargs.items())
            and query.dtype == key.dtype == value.dtype == torch.float32 and query.device.type == "cpu"
            and query.shape[3] == 64 and key.shape == value.shape and key.shape[3] == 64 and key.shape[2] >= 1
            and query.shape[0] == key.shape[0] and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and _ACTIVE.get() is not None and not torch.compiler.is_compiling())


def _with_decode_kernel(base_fn: Callable) -> Callable:
    """``base_fn`` (sdpa), with decode steps inside a stream sent to our kernel (:func:`decode_kernel_applies`)."""
    def sdpa_or_decode_kernel(module, query, key, value, attention_mask, **kwargs):
        if decode_kernel_applies(query, key, value, attention_mask, kwargs):
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            return torch.ops.infmllm.decode_attention.default(query, key, value, scaling), None
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    sdpa_or_decode_kernel.base = base_fn
    _DECODE_KERNEL_WRAPPERS.add(sdpa_or_decode_kernel)
    return sdpa_or_decode_kernel


# The wrappers themselves, not an attribute: ``functools.wraps`` copies a function's ``__dict__`` to the
# function wrapping it, which must still be called.
_DECODE_KERNEL_WRAPPERS: "weakref.WeakSet[Callable]" = weakref.WeakSet()


def is_decode_kernel_wrapper(fn: Callable) -> bool:
    """Whether ``fn`` is one of the hook's own sdpa wrappers (:func:`_with_decode_kernel`), which send a decode
    step to our kernel exactly when :func:`decode_kernel_applies`; a function wrapping or replacing one is not."""
    try:
        return fn in _DECODE_KERNEL_WRAPPERS
    except TypeError:  # not weakly referenceable: not ours
        return False


def _make_hook(base: str) -> Callable:
    def infmllm_attention(module, query, key, value, attention_mask, **kwargs):
        fn = module.__dict__.get("_infmllm_base") or _base_function(module, base)
        out, weights = fn(module, query, key, value, attention_mask, **kwargs)
        if torch.compiler.is_compiling():
            # A compiled decode step runs only where the policy needs no statistics
            # (Stream._compiled_step_allowed); the hook stays out of the graph.
            return out, weights
        cache = _ACTIVE.get()
        layer_idx = getattr(module, "_infmllm_layer", None)
        if cache is not None and layer_idx is not None and layer_idx < len(cache.layers):
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            cache.layers[layer_idx].after_attention(query, scaling, weights)
        return out, weights

    return infmllm_attention


def install(model: torch.nn.Module, decoder_attention: list[torch.nn.Module]) -> str:
    """Route the decoder's attention through the hook; returns the base implementation name.

    Idempotent. Only the configs the decoder's attention modules read are
    switched, so a VLM's vision tower keeps its own implementation.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    configs = {id(m.config): m.config for m in decoder_attention if hasattr(m, "config")}
    if not configs:
        raise ValueError("could not find the decoder's attention config")
    base = None
    for config in configs.values():
        current = config._attn_implementation or "eager"
        current_base = current[len(_PREFIX):] if current.startswith(_PREFIX) else current
        if base is not None and current_base != base:
            raise ValueError(f"decoder layers disagree on attention implementation ({base} vs {current_base})")
        base = current_base
    if base not in ("eager", "sdpa") and not base.startswith("flash"):
        raise ValueError(f"attention implementation {base!r} is not supported; use sdpa, eager or flash_attention_2")
    name = _PREFIX + base
    AttentionInterface.register(name, _make_hook(base))
    if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
    else:  # eager's mask is sdpa's, materialised
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["eager"])
    for config in configs.values():
        config._attn_implementation_internal = name
    on_cpu = all(p.device.type == "cpu" for m in decoder_attention for p in m.parameters())
    decode_kernel = base == "sdpa" and on_cpu and cpu_kernels_status()[0]
    for idx, module in enumerate(decoder_attention):
        module._infmllm_layer = idx
        base_fn = _base_function(module, base)  # resolved once, outside any compiled graph
        module._infmllm_base = _with_decode_kernel(base_fn) if decode_kernel else base_fn
        # Several streams may share one model: count them, so closing one keeps the hook for the others.
        module._infmllm_users = getattr(module, "_infmllm_users", 0) + 1
    return base


def uninstall(decoder_attention: list[torch.nn.Module], base: str) -> None:
    """Put the decoder back on its base attention implementation once no stream uses it."""
    for module in decoder_attention:
        module._infmllm_users = max(0, getattr(module, "_infmllm_users", 1) - 1)
    if any(module._infmllm_users for module in decoder_attention):
        return
    for module in decoder_attention:
        if hasattr(module, "config"):
            module.config._attn_implementation_internal = base
        for attr in ("_infmllm_layer", "_infmllm_users", "_infmllm_base"):
            if hasattr(module, attr):
                delattr(module, attr)
