#!/usr/bin/env bash
# Build (scripts/setup.sh) and run the whole test suite against the colcon
# install space: `bash scripts/test.sh [pytest args...]`
#   e.g. bash scripts/test.sh test/ros -x      bash scripts/test.sh -m "not slow"
# Exits with pytest's exit code (5 = no tests collected is a failure too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
t0=$SECONDS

bash "$ROOT/scripts/setup.sh"
t_setup=$((SECONDS - t0))

# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# The ROS tests fail (instead of skipping) when rclpy or the interfaces we
# just built don't import.
export INFMLLM_REQUIRE_ROS="${INFMLLM_REQUIRE_ROS:-1}"

echo "[test] pytest ($(command -v pytest)); ROS_DOMAIN_ID=$ROS_DOMAIN_ID RMW_IMPLEMENTATION=$RMW_IMPLEMENTATION"
# The `pytest` executable, not `python -m pytest`: the latter puts the repo
# root on sys.path, where the source tree would shadow the installed package.
set +e
pytest "$@"
rc=$?
set -e
echo "[test] setup ${t_setup}s, pytest $((SECONDS - t0 - t_setup))s, total $((SECONDS - t0))s; pytest exit code $rc"
exit "$rc"
