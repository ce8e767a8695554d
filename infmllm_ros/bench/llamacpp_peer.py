"""The llama.cpp side of ``infmllm-bench speed --peer llama.cpp``, run inside its own virtualenv.

This file imports only the standard library, numpy and ``llama_cpp`` (llama-cpp-python), so
``benchmarks/llamacpp_venv.sh``'s venv runs it without torch or transformers. The benchmark
(:mod:`infmllm_ros.bench.peers`) starts it as a child process and speaks one JSON object
per line on stdin/stdout:

    {"cmd": "load", "model": path, "n_ctx": int, "n_threads": int, "n_batch": int}
    {"cmd": "fill", "tokens": [...]}                       -> untimed: the context's first tokens
    {"cmd": "prefill", "tokens": [...], "chunk": C, "keep": K}
        each piece of C tokens is evaluated on a context cut back to its first K tokens first
        (the cut is not timed), so every piece attends to K + C tokens at most, as in a capped
        cache of budget K -> {"seconds": timed seconds of the pieces' llama_decode calls}
    {"cmd": "decode", "steps": S, "keep": K, "start": token}
        cut the context to K tokens, evaluate ``start`` (untimed), then S greedy steps (argmax of
        the last logits, evaluate that token) -> {"seconds": ..., "tokens": [...]}
    {"cmd": "quit"}

Every reply has ``"ok"``; a failure replies ``{"ok": false, "error": reason}`` and the
process keeps serving.
"""

from __future__ import annotations

import json
import sys
import time


class Peer:
    def __init__(self) -> None:
        self.llm = None

    def load(self, model: str, n_ctx: int, n_threads: int, n_batch: int) -> dict:
        import llama_cpp

        # Its best on this CPU: the same thread count for prompt and generation, a batch that
        # holds one whole chunk (one llama_decode per chunk), logits of the last token only.
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=n_threads, n_threads_batch=n_threads, logits_all=False,
                                   verbose=False)
        return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
                "n_ctx": self.llm.n_ctx(), "n_threads": n_threads, "n_batch": n_batch}

    def _cut(self, keep: int) -> None:
        """Forget every token after the first ``keep`` (``Llama.eval`` drops their KV entries)."""
        if self.llm.n_tokens > keep:
            self.llm.n_tokens = keep

    def _last_logits(self):
        """The last evaluated token's logits (with ``logits_all=False`` llama.cpp keeps only those)."""
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))

    def fill(self, tokens: list) -> dict:
        self.llm.reset()
        self.llm.eval(tokens)
        return {"n_tokens": self.llm.n_tokens}

    def prefill(self, tokens: list, chunk: int, keep: int) -> dict:
        total = 0.0
        for start in range(0, len(tokens), chunk):
            self._cut(keep)
            t0 = time.perf_counter()
            self.llm.eval(tokens[start:start + chunk])
            total += time.perf_counter() - t0
        return {"seconds": total, "n_tokens": self.llm.n_tokens}

    def decode(self, steps: int, keep: int, start: int) -> dict:
        self._cut(keep)
        self.llm.eval([start])
        out = []
        t0 = time.perf_counter()
        for _ in range(steps):
            token = int(self._last_logits().argmax())
            out.append(token)
            self.llm.eval([token])
        return {"seconds": time.perf_counter() - t0, "tokens": out, "n_tokens": self.llm.n_tokens}


def main() -> int:
    peer = Peer()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            cmd = msg.pop("cmd")
            if cmd == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return 0
            if cmd not in ("load", "fill", "prefill", "decode") or (cmd != "load" and peer.llm is None):
                raise ValueError(f"unknown command {cmd!r}, or no model loaded yet")
            reply = getattr(peer, cmd)(**msg)
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - report to the benchmark, keep serving
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
