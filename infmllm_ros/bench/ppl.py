"""Long-stream language modelling: perplexity of a novel streamed through the capped cache in chunks.

Every policy sees the same tokens in the same chunks, without the chat framing
(token i of the text is stream token i). Each chunk's logits score the chunk's
tokens; the last logit of a chunk scores the first token of the next one.
Reported: the mean perplexity over all predicted tokens and one perplexity per
``segment`` tokens (the curve). ``full`` stops at the model's context (it has
no budget, so its positions would run past what the model was trained on);
``<policy>-grow`` keeps a budget but lets positions grow (no re-rotation).
"""

from __future__ import annotations

import math
import time

import torch

from .common import (BenchConfig, emit, finite, get_model, progress, pyplot, raw_stream, record, run_label,
                     save_figure, text_token_ids, variants)


def chunk_nll(logits: torch.Tensor, piece: torch.Tensor, previous) -> tuple[list[float], torch.Tensor]:
    """NLL of a chunk's tokens (``piece`` ``[1, n]``) from its logits ``[n, vocab]``.

    ``previous``, the log-probabilities after the chunk before (None for the
    first), scores the chunk's first token. Returns (the NLLs, this chunk's
    last log-probabilities, to pass as the next chunk's ``previous``).
    """
    logp = torch.log_softmax(logits, dim=-1)
    target = piece[0]
    nll = [] if previous is None else [-float(previous[target[0]])]
    nll.extend((-logp[:-1].gather(1, target[1:, None])[:, 0]).tolist())
    return nll, logp[-1]


def stream_nll(stream, ids: torch.Tensor, chunk: int, bar=None) -> list[float]:
    """Negative log-likelihood of every token after the first, streamed in ``chunk``-token pieces."""
    from infmllm_ros.engine import Chunk

    nll: list[float] = []
    previous = None
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        logits = stream.append_chunk(Chunk(input_ids=piece), return_logits=True).logits
        piece_nll, previous = chunk_nll(logits, piece, previous)
        nll.extend(piece_nll)
        if bar is not None:
            bar.update(piece.shape[1])
    return nll


def segments(nll: list[float], segment: int) -> list[float]:
    """Perplexity per ``segment`` stream tokens (token k of ``nll`` is stream token k + 1)."""
    out = []
    for start in range(0, len(nll), segment):
        part = nll[max(0, start - 1):start + segment - 1] if start else nll[:segment - 1]
        if len(part) >= max(1, segment // 4):
            out.append(finite(math.exp(sum(part) / len(part))))
    return out


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    lm = get_model(cfg, lm)
    context = int(getattr(lm.text_config, "max_position_embeddings", 0) or 0)
    full_cap = cfg.full_cap or context or cfg.tokens
    ids = text_token_ids(lm, cfg.text, cfg.tokens)
    results = []
    for budget in cfg.budgets:
        for variant in variants(cfg, int(budget)):
            tokens = cfg.tokens
            stop = ""
            if variant.policy == "full" and tokens > full_cap:
                tokens = full_cap
                stop = f"stopped at {full_cap} tokens: the model's context (full cache, no budget)"
            stream = raw_stream(lm, variant.stream_config(cfg))
            bar = progress(tokens, f"ppl {variant.label} b={budget}")
            started = time.perf_counter()
            try:
                nll = stream_nll(stream, ids[:, :tokens], cfg.chunk, bar)
                stats = stream.stats()
            finally:
                bar.close()
                stream.close()
            elapsed = time.perf_counter() - started
            line = record(
                cfg, lm, variant, tokens=tokens, text=cfg.text, ppl=finite(math.exp(sum(nll) / len(nll))),
                segment=cfg.segment, segments=segments(nll, cfg.segment), stopped=stop, context=context,
                tokens_held=stats.tokens_held, next_position=stats.next_position, seconds=round(elapsed, 1),
                tok_s=round(tokens / elapsed, 1),
            )
            emit(cfg, line)
            results.append(line)
    return results


def plot(cfg: BenchConfig, results: list[dict], lm=None) -> list:
    plt = pyplot()
    paths = []
    for budget in sorted({r["budget"] for r in results}):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in (r for r in results if r["budget"] == budget):
            seg = r["segments"]
            xs = [(i + 1) * r["segment"] / 1000 for i in range(len(seg))]
            ax.plot(xs, seg, marker="o", ms=3, label=f"{r['policy']} (mean {r['ppl']:.1f})")
        ctx = results[0].get("context") or 0
        if ctx:
            ax.axvline(ctx / 1000, color="grey", ls=":", lw=1)
            ax.text(ctx / 1000, ax.get_ylim()[1], " model context", va="top", fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_xlabel(f"stream position (K tokens; ppl per {results[0]['segment']}-token segment)")
        ax.set_ylabel("perplexity (log scale)")
        r0 = results[0]
        ax.set_title(f"Perplexity of a streamed novel, budget {budget}, chunk {r0['chunk']}\n" +
                     run_label(r0), fontsize=9)
        ax.legend(fontsize=8)
        path = save_figure(fig, cfg, f"ppl_b{budget}")
        paths.append(path)
    return paths
