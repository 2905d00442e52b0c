#!/usr/bin/env bash
# The test suite on CPU (tests/conftest.py sets 8 simulated devices). Installs the [test] extra and the
# [hf] parity extra with the CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,hf]" 2>&1 | grep -v "^WARNING: Location" || true
export JAX_PLATFORMS=cpu
# Compiled executables cached on disk (shared by workers and subprocesses; tests/conftest.py says why).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax-tests}" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.3
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q --durations=25 "$@"
