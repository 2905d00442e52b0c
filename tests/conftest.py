"""8 simulated CPU devices, set before jax is imported anywhere in the test session."""

import gc
import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
# R1JAX_TEST_PLATFORMS=cuda runs the GPU-marked tests on a GPU machine (`pytest -m gpu`); CI stays on CPU.
os.environ["JAX_PLATFORMS"] = os.environ.get("R1JAX_TEST_PLATFORMS", "cpu")
# Compiled executables are cached on disk and shared by the xdist workers and the CLI subprocesses: many
# tests compile the same tiny-model steps, and the R1 pipeline test compiles one step per stage.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import pytest  # noqa: E402

from r1jax import config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny():
  """The tiny preset in float32 compute, so references can be compared at fp32 tolerances."""
  return config.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                     ["compute.dtype=float32"])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """XLA:CPU maps memory for every compiled executable; a worker that keeps all of a suite's executables alive
  passes Linux's vm.max_map_count (65,530) and aborts ("LLVM compilation error: Cannot allocate memory").
  Dropping jax's caches after each test file frees them; a file's own tests still share its compilations."""
  yield
  jax.clear_caches()
  gc.collect()
