"""int8 and int4 weights: what each costs in perplexity next to what it buys in speed, on the same stream.

The model is loaded once in float32 and copied with its Linear layers in int8
and, where torch has the int4 CPU kernel and the model is on the CPU, in int4
(:func:`~infmllm_ros.engine.models.quantize_model`). All stream the same text
through the same Inf-MLLM cache (policy, budget, chunk):

1. perplexity over ``tokens`` tokens of the text (as ``infmllm-bench ppl``), fed
   in ``chunk``-token pieces (the prefill path) and one token at a time
   (``ppl_tokenwise``: the path decode takes, which is where int4 reads its
   4-bit weights; prefill keeps the float ones);
2. speed: each filled to ``budget + chunk`` tokens, then ``repeats``
   interleaved rounds of ``tokens`` chunked prefill and ``decode_tokens``
   greedy decode steps (as ``infmllm-bench speed``).

Reported per precision: ppl, prefill and decode tokens/s (medians); each
quantised line carries ``vs_float32``: the ppl ratio (>1 = worse) and the speed ratios
(>1 = faster), each speed ratio the median of the within-round ratios.
"""

from __future__ import annotations

import copy
import math
import statistics

from .common import BenchConfig, emit, finite, get_model, progress, raw_stream, record, text_token_ids, variants
from .ppl import stream_nll
from .speed import _decode, _prefill


def _quantized_copy(lm, method: str):
    from infmllm_ros.engine import LoadedModel
    from infmllm_ros.engine.models import quantize_model

    model = quantize_model(copy.deepcopy(lm.model), method)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, processor=lm.processor, name=lm.name, quantize=method)


def precisions(lm) -> list[str]:
    """The quantisations this model can run here, after float32: int8 always, int4 on the CPU with its kernel."""
    from infmllm_ros.engine.int4 import int4_kernel_available

    return ["int8"] + (["int4"] if int4_kernel_available(lm.device) else [])


def run(cfg: BenchConfig, lm=None) -> list[dict]:
    lm = get_model(cfg, lm)
    if getattr(lm, "quantize", "none") != "none":
        raise ValueError("the quant benchmark quantizes a float32 model itself: run it with quantize none")
    models = {"float32": lm, **{method: _quantized_copy(lm, method) for method in precisions(lm)}}
    results = []
    for budget in cfg.budgets:
        variant = variants(cfg, int(budget), ["infmllm"])[0]
        fill = int(budget) + cfg.chunk
        ids = text_token_ids(lm, cfg.text, max(cfg.tokens, fill + cfg.repeats * cfg.tokens))
        figures = {name: {"prefill": [], "decode": []} for name in models}
        ppl, ppl_tokenwise = {}, {}
        for name, m in models.items():
            for figure, piece in ((ppl, cfg.chunk), (ppl_tokenwise, 1)):
                stream = raw_stream(m, variant.stream_config(cfg))
                bar = progress(cfg.tokens, f"quant ppl {name} b={budget} chunk {piece}")
                try:
                    nll = stream_nll(stream, ids[:, :cfg.tokens], piece, bar)
                finally:
                    bar.close()
                    stream.close()
                figure[name] = finite(math.exp(sum(nll) / len(nll)))
        streams = {name: raw_stream(m, variant.stream_config(cfg)) for name, m in models.items()}
        try:
            for name, s in streams.items():
                _prefill(s, ids[:, :fill], cfg.chunk, models[name])
            names = list(models)
            for rnd in range(cfg.repeats):
                block = ids[:, fill + rnd * cfg.tokens: fill + (rnd + 1) * cfg.tokens]
                first = rnd % len(names)
                for name in names[first:] + names[:first]:
                    s, m = streams[name], models[name]
                    figures[name]["prefill"].append(block.shape[1] / _prefill(s, block, cfg.chunk, m))
                    figures[name]["decode"].append(cfg.decode_tokens / _decode(s, cfg.decode_tokens, m))
        finally:
            for s in streams.values():
                s.close()
        lines = []
        for name, m in models.items():
            f = figures[name]
            lines.append(record(cfg, m, variant, tokens=cfg.tokens, ppl=ppl[name],
                                ppl_tokenwise=ppl_tokenwise[name], precision=name,
                                prefill_tok_s=statistics.median(f["prefill"]),
                                decode_tok_s=statistics.median(f["decode"]), decode_tokens=cfg.decode_tokens,
                                repeats=cfg.repeats, prefill_runs=f["prefill"], decode_runs=f["decode"]))
        base = figures["float32"]
        for line, name in zip(lines[1:], list(models)[1:]):
            q = figures[name]
            line["vs_float32"] = {
                "ppl": ppl[name] / ppl["float32"],
                "ppl_tokenwise": ppl_tokenwise[name] / ppl_tokenwise["float32"],
                "prefill": statistics.median(a / b for a, b in zip(q["prefill"], base["prefill"])),
                "decode": statistics.median(a / b for a, b in zip(q["decode"], base["decode"])),
            }
        for line in lines:
            emit(cfg, line)
        results.extend(lines)
    return results
