"""Benchmarks (issue #7): ``infmllm-bench ppl|recall|speed|memory|gpu``; see docs/benchmarks.md.

Each benchmark module has ``run(cfg, lm=None) -> list[dict]`` (one result per
policy variant) and ``plot(cfg, results, lm)``; :mod:`.cli` wires them up.
"""

from .common import BenchConfig, Variant, load_config, variants

__all__ = ["BenchConfig", "Variant", "load_config", "variants"]
