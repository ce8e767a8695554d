"""Our CPU kernels (``csrc/``): built once per machine, used where they run, never required.

Six ops, in one library that torch's C++ extension loader builds on first
use (g++ and ninja, ~30 s; cached under ``TORCH_EXTENSIONS_DIR``, and built by
``scripts/setup.sh`` so that the first node start does not wait):

* ``infmllm::q4_1_matmul`` and ``infmllm::q8_0_matmul``
  (``csrc/blocks_matmul.cpp``): few-row products with llama.cpp's Q4_1 and
  Q8_0 blocks, for :mod:`.int4`.
* ``infmllm::decode_attention`` (``csrc/decode_attention.cpp``): one query
  token's attention over a float32 KV cache, for the attention hook
  (:mod:`.attention`).
* ``infmllm::window_column_sums`` (``csrc/decode_attention.cpp``): a chunk's
  queries' attention probabilities over the cached keys, summed per key, for
  the policies' scoring (:func:`.cache.column_attention`).
* ``infmllm::decode_qkv`` and ``infmllm::decode_mlp`` (``csrc/decode_layer.cpp``):
  the rest of one decode token's decoder layer (the norms, the 4-bit products,
  RoPE, the residual sums and the gated MLP) in two calls, with the model's own
  arithmetic, for :class:`~.decode.DirectDecodeStep`.

They need an x86 CPU with AVX2 (with FMA and F16C, which every AVX2 CPU has).
Where they cannot be built or loaded, or with ``INFMLLM_CPU_KERNELS=0``, the
engine uses torch's own kernels and :func:`cpu_kernels_status` says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

_LOG = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (_CSRC / "blocks_matmul.cpp", _CSRC / "decode_attention.cpp", _CSRC / "decode_layer.cpp")
_lock = threading.Lock()
_state: Optional[tuple[bool, str]] = None  # (built, why not) once tried


def cpu_kernels_status() -> tuple[bool, str]:
    """Whether our CPU kernels are usable here, building them on first call; ``(False, reason)`` if not.

    The build happens once per source version and machine; later processes load
    the cached library. Never raises: any failure is the reason.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _build()
            if not _state[0]:
                _LOG.info("our CPU kernels are not used (%s); torch's are", _state[1])
        return _state


def _build() -> tuple[bool, str]:
    if os.environ.get("INFMLLM_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return False, "INFMLLM_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):  # AVX2 in torch's sense includes FMA; every AVX2 CPU has F16C
        return False, f"they need an x86 CPU with AVX2, this one reports {capability}"
    missing = [str(p) for p in SOURCES if not p.is_file()]
    if missing:
        return False, f"their sources are missing: {', '.join(missing)}"
    if hasattr(torch.ops, "infmllm") and hasattr(torch.ops.infmllm, "window_column_sums"):
        return True, ""  # loaded already in this process
    try:
        from torch.utils.cpp_extension import load

        venv_bin = str(Path(sys.executable).parent)  # pip's ninja, where the venv is not on PATH
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        _LOG.info("building our CPU kernels (once per machine, ~30 s)")
        load("infmllm_cpu_kernels", [str(p) for p in SOURCES], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"])
        # What torch.compile is told about each op's output.
        for op in ("infmllm::q4_1_matmul", "infmllm::q8_0_matmul"):
            torch.library.register_fake(op)(lambda x, blocks: x.new_empty(x.shape[0], blocks.shape[0]))
        torch.library.register_fake("infmllm::decode_attention")(
            lambda q, k, v, scale: q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3]))
        torch.library.register_fake("infmllm::decode_qkv")(
            lambda hidden, weight, eps, blocks, q_heads, kv_heads, cos, sin: tuple(
                hidden.new_empty(1, heads, 1, cos.shape[-1]) for heads in (q_heads, kv_heads, kv_heads)))
        torch.library.register_fake("infmllm::decode_mlp")(lambda hidden, *rest: hidden.new_empty(hidden.shape))
        torch.library.register_fake("infmllm::window_column_sums")(
            lambda q, k, scale, offset: k.new_empty(k.shape[0], k.shape[1], k.shape[2]))
    except Exception as exc:  # no compiler, no ninja, a read-only cache folder, ...
        lines = str(exc).strip().splitlines()
        return False, f"they did not build: {type(exc).__name__}: {lines[-1] if lines else ''}"
    return True, ""
