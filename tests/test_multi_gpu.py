"""Expert parallelism across the GPUs of one host: the sharded MoE layer and whole train steps equal the 1-GPU
run in fp32 (routing cannot flip). Run on a multi-GPU machine with
`R1JAX_TEST_PLATFORMS=cuda python -m pytest -m gpu tests/test_multi_gpu.py`; skipped elsewhere (CI has the
same comparisons on 8 simulated CPU devices: test_expert_parallel.py, test_model.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import sharding, train
from r1jax.batch import Batch
from r1jax.config import MeshConfig
from r1jax.nn import layers, moe

N_GPUS = jax.device_count() if jax.default_backend() == "gpu" else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS < 2, reason="needs 2 or more NVIDIA GPUs")]


def _meshes():
  meshes = {"expert": MeshConfig(data=1, expert=N_GPUS)}
  if N_GPUS >= 4:
    meshes["data2_expert"] = MeshConfig(data=2, expert=N_GPUS // 2)
  return meshes


@pytest.mark.parametrize("name", ["expert", "data2_expert"])
def test_moe_layer_on_all_gpus_equals_one_gpu(tiny, name):
  if name not in _meshes():
    pytest.skip("needs 4 GPUs")
  cfg, compute = tiny.model, tiny.compute
  boxed = moe.init(jax.random.key(0), cfg, compute)
  x = jax.random.normal(jax.random.key(1), (2 * N_GPUS, 64, cfg.dim))

  def loss(p, x):
    y, stats = moe.apply(p, x, cfg, compute)
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"], (y, stats["load"])

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, (y_one, load_one)), g_one = grad(jax.device_put(layers.unbox(boxed), jax.devices()[0]), x)
  mesh = sharding.make_mesh(_meshes()[name])
  with jax.set_mesh(mesh):
    (_, (y, load)), g = grad(jax.device_put(layers.unbox(boxed), layers.shardings(boxed, mesh)), x)
  np.testing.assert_array_equal(load, load_one)
  np.testing.assert_allclose(y, y_one, rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_one)


@pytest.mark.parametrize("name", ["expert", "data2_expert"])
def test_train_steps_on_all_gpus_equal_one_gpu(tiny, name):
  if name not in _meshes():
    pytest.skip("needs 4 GPUs")
  rng = np.random.default_rng(0)
  B, L = 2 * N_GPUS, 32
  tokens = rng.integers(3, tiny.model.vocab_size, (3, B, L + 1)).astype(np.int32)
  batches = [Batch(t[:, :-1], t[:, 1:], np.ones((B, L), np.int32)) for t in tokens]

  def run(mesh_cfg, devices):
    cfg = dataclasses.replace(tiny, mesh=mesh_cfg)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    with jax.set_mesh(mesh):
      state = train.init_state(cfg, jax.random.key(0), mesh)
      step = train.jit_sft_step(state, batches[0], mesh)
      losses = []
      for b in batches:
        state, metrics = step(state, jax.device_put(b, train.batch_shardings(b, mesh)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)

  losses_one, params_one = run(MeshConfig(data=1), jax.devices()[:1])
  losses, params = run(_meshes()[name], jax.devices())
  np.testing.assert_allclose(losses, losses_one, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, params_one)
