#!/usr/bin/env bash
# Build (scripts/setup.sh) and run the demo: `bash scripts/demo.sh [demo args...]`
# (infmllm-demo: the node on the sample video in ../shared/data, see README).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
cd "$ROOT"

if ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("infmllm_ros.ros.demo") is None)' 2>/dev/null; then
  echo "[demo] infmllm_ros.ros.demo is not there yet (the demo entry point infmllm_ros.ros.demo:main is still to be written)." >&2
  exit 2
fi
exec infmllm-demo "$@"
