"""The dropless grouped GEMM: the sorted layout against its definition, the Pallas Triton kernels (interpret mode
on CPU) against XLA's ragged_dot in values and gradients, and the MoE layer on the grouped path against the
capacity-padded einsum at a capacity that drops nothing (1 device and an expert/fsdp/tensor mesh)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, model, sharding
from r1jax.config import ConfigError
from r1jax.nn import expert_ffn, expert_parallel, grouped_gemm, moe


def _routing(T=40, K=3, E=5, seed=0):
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(T)]).astype(np.int32)  # E-1: empty
  valid = rng.random(T) > 0.2
  return jnp.asarray(experts), jnp.asarray(valid)


@pytest.mark.parametrize("bm", [16, 32])
def test_layout_sorts_each_pair_into_its_experts_tile_aligned_group(bm):
  experts, valid = _routing()
  T, K = experts.shape
  E = 5
  lay = grouped_gemm.layout(experts, valid, E, bm)
  R = lay.token_R.shape[0]
  assert R % bm == 0 and R >= T * K + E * (bm - 1) and lay.bm == bm
  row, token, group = (np.asarray(a) for a in (lay.row_TK, lay.token_R, lay.tile_group_G))
  ex, ok = np.asarray(experts).reshape(-1), np.repeat(np.asarray(valid), K)
  assert (row[~ok] == R).all() and len(set(row[ok])) == ok.sum()  # one row per valid pair, none for padding
  assert (token[row[ok]] == np.flatnonzero(ok) // K).all()
  assert (group[row[ok] // bm] == ex[ok]).all()  # a pair's tile belongs to its expert
  counts = np.bincount(ex[ok], minlength=E)
  np.testing.assert_array_equal(lay.tiles_E, -(-counts // bm))
  assert int(lay.used) == (-(-counts // bm)).sum() and counts[4] == 0
  assert ((token == T) == ~np.isin(np.arange(R), row[ok])).all()  # every other row reads the zero row
  # first come first served within an expert: rows ascend with the pair index
  for e in range(E):
    pairs = np.flatnonzero(ok & (ex == e))
    assert (np.diff(row[pairs]) == 1).all() and (row[pairs[:1]] % bm == 0).all()


def test_row_tile_shrinks_for_a_decode_steps_few_rows():
  assert grouped_gemm.row_tile(16384 * 4, 32) == 128
  assert grouped_gemm.row_tile(64 * 4, 32) == 16
  assert grouped_gemm.row_tile(600, 8) == 128 and grouped_gemm.row_tile(320, 8) == 64


def _swiglu64(experts, x_TxD, experts_TxK, weights_TxK, valid_T):
  """The routed experts in float64 numpy, token by token: sum_k w_tk SwiGLU_{e_tk}(x_t)."""
  x, e, w = (np.asarray(a, np.float64) for a in (x_TxD, experts_TxK, weights_TxK))
  g, u, d = (np.asarray(experts[k], np.float64) for k in ("w_gate", "w_up", "w_down"))
  y = np.zeros_like(x)
  for t in np.flatnonzero(np.asarray(valid_T)):
    for k, ex in enumerate(e[t].astype(int)):
      a, b = x[t] @ g[ex], x[t] @ u[ex]
      y[t] += w[t, k] * ((a / (1 + np.exp(-a)) * b) @ d[ex])
  return y


def _experts(E=5, D=32, F=16, seed=1):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"w_gate": jax.random.normal(k[0], (E, D, F)) / np.sqrt(D),
          "w_up": jax.random.normal(k[1], (E, D, F)) / np.sqrt(D),
          "w_down": jax.random.normal(k[2], (E, F, D)) / np.sqrt(F)}


def _combine(experts, x, experts_TxK, weights_TxK, valid, kernel, interpret=False):
  fn = lambda e, x_RxD, lay: grouped_gemm.swiglu(e, x_RxD, lay, kernel, interpret)  # noqa: E731
  return expert_parallel._sorted_combine(experts, x, weights_TxK, experts_TxK, valid, 5, fn)[0]


@pytest.mark.parametrize("kernel", ["xla", "triton"])
def test_grouped_swiglu_equals_the_float64_reference(kernel):
  """fp32 GEMMs of depth <= 32 on O(1) values: rounding ~1e-6; the Triton kernels run in interpret mode."""
  experts_TxK, valid = _routing()
  T, K = experts_TxK.shape
  x = jax.random.normal(jax.random.key(2), (T, 32))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(3), (T, K)), -1)
  params = _experts()
  y = _combine(params, x, experts_TxK, w, valid, kernel, interpret=True)
  np.testing.assert_allclose(y, _swiglu64(params, x, experts_TxK, w, valid), rtol=1e-5, atol=1e-5)
  assert (np.asarray(y)[~np.asarray(valid)] == 0).all()


def test_triton_kernels_gradients_equal_xlas():
  """The kernels' dx (transposed gmm) and dw (tgmm over each expert's tiles, an empty expert's zero) against
  ragged_dot's autodiff, fp32."""
  experts_TxK, valid = _routing()
  T, K = experts_TxK.shape
  x = jax.random.normal(jax.random.key(2), (T, 32))
  w = jax.nn.softmax(jax.random.normal(jax.random.key(3), (T, K)), -1)
  cot = jax.random.normal(jax.random.key(4), (T, 32))

  def loss(kernel):
    return lambda p, x: jnp.sum(_combine(p, x, experts_TxK, w, valid, kernel, interpret=True) * cot)

  ref = jax.grad(loss("xla"), argnums=(0, 1))(_experts(), x)
  got = jax.grad(loss("triton"), argnums=(0, 1))(_experts(), x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[0]["w_gate"][4]).max()) == 0.0  # expert 4 had no rows


def _tiny(*overrides):
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  run = config.load(os.path.join(root, "tiny.yaml"), ["compute.dtype=float32", *overrides])
  return run


@pytest.fixture(scope="module")
def moe_case():
  run = _tiny()
  p = model.init(run.model, run.compute, jax.random.key(5))
  layer = jax.tree.map(lambda a: a[0], p["moe_layers"]["ffn"])
  x = jax.random.normal(jax.random.key(6), (4, 12, run.model.dim))
  mask = jnp.ones((4, 12), jnp.int32).at[3, 7:].set(0)  # padding takes no row
  return run, layer, x, moe.Tokens(mask, jnp.zeros((4, 12), jnp.int32))


@pytest.mark.parametrize("mesh_overrides", [[], ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]])
def test_grouped_moe_layer_equals_the_padded_einsum_that_drops_nothing(moe_case, mesh_overrides):
  """Values and gradients (x and every weight) of moe.apply: grouped (XLA kernel) against einsum at capacity 0
  (C = T rows per expert, so neither drops). On the mesh the grouped FFN runs on each expert shard's received
  rows (compact_sorted); on one device, on the sorted pairs. fp32: the same products summed in other orders."""
  run, layer, x, tokens = moe_case

  def run_layer(gemm):
    compute = dataclasses.replace(run.compute, expert_gemm=gemm, grouped_kernel="xla", capacity_factor=0.0)

    def f(p, x):
      y, stats = moe.apply(p, x, run.model, compute, tokens)
      return jnp.sum(y * jnp.cos(x)), (y, stats["dropped_pairs"])

    return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(layer, x)

  mesh_cfg = config.apply_overrides(run, mesh_overrides).mesh if mesh_overrides else None
  if mesh_cfg is not None:
    with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
      got, ref = run_layer("grouped"), run_layer("einsum")
  else:
    got, ref = run_layer("grouped"), run_layer("einsum")
  (g_got, (y_got, dropped)), (g_ref, (y_ref, _)) = got, ref
  assert int(dropped) == 0
  np.testing.assert_allclose(y_got, y_ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_choices_are_said_not_swapped(monkeypatch):
  run = _tiny()
  with pytest.raises(ConfigError, match="compute.expert_gemm.*dropless"):
    config.apply_overrides(run, ["compute.expert_gemm=grouped", "compute.capacity_factor=1.25"])
  with pytest.raises(ConfigError, match="grouped_kernel=triton runs on a GPU only"):
    expert_ffn.grouped_kernel(dataclasses.replace(run.compute, grouped_kernel="triton"))
  fp8_on = dataclasses.replace(run.compute, expert_gemm="grouped", grouped_kernel="auto",
                               fp8=dataclasses.replace(run.compute.fp8, enabled=True))
  with monkeypatch.context() as m:  # as on a GPU, where auto picks the Triton kernels
    m.setattr(expert_ffn.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="no FP8 Triton kernel yet"):
      expert_ffn.choose(fp8_on, {})
  assert expert_ffn.gemm_impl(run.compute) == "einsum"  # auto off TPU, until the kernels are measured on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [None, grouped_gemm.triton.Tiles(bn=256, num_warps=8)])
def test_triton_kernels_on_a_gpu_equal_xla(tiles):
  """The compiled kernels (not interpret mode) at a bench-like width, bf16 operands, fp32 accumulation in both:
  values and gradients within bf16 rounding of the outputs (2e-2 of the largest)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  T, K, E, D, F = 1024, 4, 8, 512, 256
  experts_TxK = jnp.argsort(jax.random.uniform(jax.random.key(0), (T, E)), axis=-1)[:, :K].astype(jnp.int32)
  experts_TxK = jnp.where(experts_TxK == 7, 0, experts_TxK)  # expert 7 empty (token-level duplicates are fine)
  w = jax.nn.softmax(jax.random.normal(jax.random.key(1), (T, K)), -1)
  x = jax.random.normal(jax.random.key(2), (T, D), jnp.bfloat16)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _experts(E, D, F))
  cot = jax.random.normal(jax.random.key(3), (T, D), jnp.float32)

  def loss(kernel):
    def f(p, x):  # 1024 x 4 pairs over 8 experts: 128-row tiles
      fn = lambda e, x_RxD, lay: grouped_gemm.swiglu(e, x_RxD, lay, kernel, tiles=tiles)  # noqa: E731
      return jnp.sum(expert_parallel._sorted_combine(p, x, w, experts_TxK, None, E, fn)[0].astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  (v_ref, g_ref), (v, g) = loss("xla")(params, x), loss("triton")(params, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
  assert float(jnp.abs(g[0]["w_up"][7]).max()) == 0.0
  np.testing.assert_allclose(float(v), float(v_ref), rtol=2e-2)


def test_memory_estimate_counts_the_sorted_rows_not_capacity_buffers():
  """`r1jax info`'s activation estimate for the bench model: dropless on the padded einsum holds E = 32 rows per
  token in each expert buffer, the grouped layout K + E*(bm-1)/T = 4.25."""
  from r1jax import memory
  run = config.load(os.path.join(os.path.dirname(__file__), "..", "configs", "bench_gpu.yaml"),
                    ["compute.capacity_factor=0", "compute.remat=none"])
  sizes = {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
  est = {g: memory.activation_bytes(run.model, dataclasses.replace(run.compute, expert_gemm=g), sizes, 8, 2048, True)
         for g in ("einsum", "grouped")}
  m = run.model
  per_row = (2 * m.dim + 4 * m.moe_inter_dim) * 2 * 16384 * (m.n_moe_layers + m.n_mtp)  # bf16, remat none
  rows = (16384 * m.n_activated_experts + m.n_routed_experts * 127) / 16384
  assert est["einsum"] - est["grouped"] == pytest.approx((m.n_routed_experts - rows) * per_row, rel=1e-6)


def test_fp8_grouped_layer_equals_the_fp8_ragged_dot_path(moe_case):
  """FP8 routed experts on the sorted layout (grouped_kernel=xla: fp8/ragged.py over the padded groups) against
  the same recipe on the capacity buffers' valid rows (expert_gemm=ragged_dot): activations quantise per row
  and weights per expert block, so both see the same e4m3 values; fp32 outputs and gradients agree to
  summation order. tiny.yaml's dims are 64, so 32-wide blocks."""
  run, layer, x, tokens = moe_case
  fp8_cfg = dataclasses.replace(run.compute.fp8, enabled=True, block=32, attention=False, dense_mlp=False,
                                shared_experts=False, mtp_proj=False)

  def grads(gemm):
    compute = dataclasses.replace(run.compute, expert_gemm=gemm, grouped_kernel="xla", capacity_factor=0.0,
                                  fp8=fp8_cfg)
    f = lambda p, x: jnp.sum(moe.apply(p, x, run.model, compute, tokens)[0] * jnp.cos(x))  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(layer, x)

  (v, g), (v_ref, g_ref) = grads("grouped"), grads("ragged_dot")
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tiles_beyond_shared_memory_are_named():
  """A K step's tiles buffered num_stages deep must fit a Hopper block's 227 KiB: 4 x (128 + 256) x 128 bf16 does
  not (the weight-gradient kernel caps its tiles at 128 for the same reason)."""
  x = jnp.zeros((128, 256), jnp.bfloat16)
  w = jnp.zeros((1, 256, 256), jnp.bfloat16)
  tiles = grouped_gemm.triton.Tiles(bn=256, bk=128, num_stages=4)
  with pytest.raises(ValueError, match="shared memory"):
    grouped_gemm.triton.gmm(x, w, jnp.zeros(1, jnp.int32), 1, bm=128, tiles=tiles, interpret=True)
