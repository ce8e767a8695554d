#!/usr/bin/env bash
# Builds (on first use) the virtualenv in which `infmllm-bench speed --peer llama.cpp` runs its peer:
# llama-cpp-python 0.3.36 compiled from source for this machine's CPU (no wheel on PyPI for it).
#   bash benchmarks/llamacpp_venv.sh          # prints the venv's python; builds it first if missing
# Env: LLAMACPP_VENV (default <repo>/.venv-llamacpp), INFMLLM_PYTHON (default python3.11),
#      LLAMACPP_CMAKE_ARGS (default: a native CPU build; the llama.cpp build options as -D flags).
# The build takes ~10 min on 2 cores; it runs under nice so it yields to interactive work.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLAMACPP_VENV:-$repo/.venv-llamacpp}"
spec="llama-cpp-python==0.3.36"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
echo "[llama.cpp] building $venv ($spec from source, ~10 min on 2 cores)" >&2
"${INFMLLM_PYTHON:-python3.11}" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >&2
# CPU only; GGML_NATIVE tunes the kernels to this CPU (AVX2/AVX-512 as present), as a local user's build would.
# OpenMP is llama.cpp's default threading; n_threads is still set per run by the benchmark.
export CMAKE_ARGS="${LLAMACPP_CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
nice -n 10 "$venv/bin/pip" install -q --no-cache-dir "$spec" >&2
"$venv/bin/python" -c 'import llama_cpp; print("[llama.cpp] built llama-cpp-python", llama_cpp.__version__)' >&2
echo "$venv/bin/python"
