"""The FP8 grouped GEMM (nn/fp8.ragged.py): DeepSeek's block-scaled recipe (V3 report §3.3) over rows sorted
by expert, against a float64 numpy version of the recipe, against fp8.dot run per group, and wired into the
expert-parallel layer's ragged_dot path (compute.expert_gemm=ragged_dot) against its einsum FP8 path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fp8 import np_deq_act, np_deq_weight, np_quant_act, np_quant_weight, rel_fro

from r1jax import config, sharding
from r1jax.config import FP8Config, MeshConfig
from r1jax.nn import expert_ffn, fp8, layers, moe

# (N rows, K, F, block, group sizes): empty groups, groups shorter than a block and straddling blocks, and
# trailing rows in no group; the second case at DeepSeek's block 128.
CASES = [(100, 64, 96, 32, [30, 0, 45, 15, 0]), (300, 256, 128, 128, [140, 0, 150])]


def operands(N, K, F, G, seed=0):
  """x ~ N(0, 1), w ~ N(0, 1/K) with scales spread per group over 1e-2..10, dy ~ N(0, 1)."""
  rng = np.random.default_rng(seed)
  w_scale = 10.0 ** rng.uniform(-2, 1, (G, 1, 1)) / np.sqrt(K)
  return (rng.standard_normal((N, K)).astype(np.float32), (rng.standard_normal((G, K, F)) * w_scale).astype(np.float32),
          rng.standard_normal((N, F)).astype(np.float32))


def bounds(group_sizes):
  ends = np.cumsum(group_sizes)
  return list(zip(ends - group_sizes, ends))


def np_ragged(a_NxK, b_GxKxF, group_sizes):
  """float64 grouped product: each group's rows times its matrix; rows past the groups stay zero."""
  out = np.zeros((a_NxK.shape[0], b_GxKxF.shape[-1]))
  for g, (s, e) in enumerate(bounds(group_sizes)):
    out[s:e] = a_NxK[s:e] @ b_GxKxF[g]
  return out


def np_deq_weights(w_GxKxF, block, pow2=False):
  return np.stack([np_deq_weight(*np_quant_weight(w, block, pow2)) for w in w_GxKxF])


def _grads(f, x, w, dy):
  """(dx, dw) of sum(f(x, w) * dy), jitted."""
  return jax.jit(jax.grad(lambda x, w, dy: jnp.sum(f(x, w) * dy), argnums=(0, 1)))(x, w, dy)


def _ragged(group_sizes, block, pow2=False):
  gs = jnp.asarray(group_sizes, jnp.int32)
  return lambda x, w: fp8.ragged.ragged_dot(x, w, gs, block=block, pow2=pow2)  # noqa: E731


@pytest.mark.parametrize("N,K,F,block,group_sizes", CASES)
def test_forward_is_the_grouped_product_of_dequantised_operands(N, K, F, block, group_sizes):
  """Same e4m3 operands and scales as numpy: only fp32 accumulation (K <= 256 terms, ~sqrt(K) * 2^-24
  relative) and the fp32 scale products separate it from float64; 1e-5 leaves margin, as in test_fp8."""
  x, w, _ = operands(N, K, F, len(group_sizes))
  ref = np_ragged(np_deq_act(*np_quant_act(x, block)), np_deq_weights(w, block), group_sizes)
  y = np.asarray(jax.jit(_ragged(group_sizes, block))(jnp.asarray(x), jnp.asarray(w)))
  assert y.dtype == np.float32 and y.shape == (N, F)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rows_past_the_groups_and_empty_groups_are_zero():
  """Like lax.ragged_dot: rows after sum(group_sizes) give exact zeros, forward and dx; an empty group's
  weight gets an exactly zero gradient."""
  N, K, F, block, group_sizes = CASES[0]
  x, w, dy = (jnp.asarray(t) for t in operands(N, K, F, len(group_sizes), seed=1))
  f = _ragged(group_sizes, block)
  y, (dx, dw) = jax.jit(f)(x, w), _grads(f, x, w, dy)
  end = sum(group_sizes)
  assert not np.asarray(y[end:]).any() and not np.asarray(dx[end:]).any()
  assert not np.asarray(dw[1]).any() and not np.asarray(dw[4]).any()
  assert np.asarray(y[:end]).all() and np.asarray(dw[0]).any()


def test_equals_fp8_dot_per_group():
  """Each group's rows through fp8.dot with its own weight: the same quantisation everywhere (1 x block
  rows, block x block weight tiles, and for dw the group's tokens in their own block x 1 tiles, since
  fp8.dot pads its rows as each group is padded here), so only fp32 summation order differs: 1e-6."""
  N, K, F, block, group_sizes = CASES[0]
  x, w, dy = (jnp.asarray(t) for t in operands(N, K, F, len(group_sizes), seed=2))
  f = _ragged(group_sizes, block)
  y, (dx, dw) = jax.jit(f)(x, w), _grads(f, x, w, dy)
  one = lambda x, w: fp8.dot(x, w, block=block)  # noqa: E731
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())  # noqa: E731
  for g, (s, e) in enumerate(bounds(group_sizes)):
    if e == s:
      continue
    dx_g, dw_g = _grads(one, x[s:e], w[g], dy[s:e])
    close(y[s:e], jax.jit(one)(x[s:e], w[g]))
    close(dx[s:e], dx_g)
    close(dw[g], dw_g)


def test_bounded_partials_give_the_same_result(monkeypatch):
  """xla.PARTIAL_BYTES bounds the fp32 partials: at 50 kB the forward and dgrad take one K block at a time
  (the [N, F] partial is 38 kB) and wgrad two 24 kB token tiles, with one all-zero tile evening the last
  chunk (7 tiles -> 4 x 2). The same products in another summation order: 1e-6."""
  N, K, F, block, group_sizes = CASES[0]
  x, w, dy = (jnp.asarray(t) for t in operands(N, K, F, len(group_sizes), seed=5))
  f = _ragged(group_sizes, block)
  y, grads = jax.jit(f)(x, w), _grads(f, x, w, dy)
  monkeypatch.setattr(fp8.kernels.xla, "PARTIAL_BYTES", 50_000)
  f = _ragged(group_sizes, block)  # a new function: traced again under the smaller bound
  for got, want in zip((jax.jit(f)(x, w), *_grads(f, x, w, dy)), (y, *grads)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("case,pow2", [(0, False), (0, True), (1, False)])
def test_backward_gemms_follow_the_recipe_exactly(case, pow2):
  """float64 numpy of V3 Figure 6 per group: dgrad = deq(q_1xB(dy)) @ deq(q_BxB(w_g))^T; wgrad = deq(q(x_g^T))
  @ deq(q(dy_g^T))^T, x the cached fp8 activation dequantised, x_g and dy_g zero-padded to whole B-token
  tiles per group. Products of identical e4m3 operands and scales: 1e-5 as in the forward."""
  N, K, F, block, group_sizes = CASES[case]
  x, w, dy = operands(N, K, F, len(group_sizes), seed=3)
  dx, dw = (np.asarray(g) for g in _grads(_ragged(group_sizes, block, pow2), *map(jnp.asarray, (x, w, dy))))
  deq_w = np_deq_weights(w, block, pow2)
  dx_ref = np_ragged(np_deq_act(*np_quant_act(dy, block, pow2)), deq_w.transpose(0, 2, 1), group_sizes)
  x_cached = np_deq_act(*np_quant_act(x, block, pow2)).astype(np.float32)
  tiles = lambda t: np.concatenate([t, np.zeros((-len(t) % block, t.shape[1]), np.float32)]).T  # noqa: E731
  dw_ref = np.zeros(w.shape)
  for g, (s, e) in enumerate(bounds(group_sizes)):
    if e > s:
      dw_ref[g] = np_deq_act(*np_quant_act(tiles(x_cached[s:e]), block, pow2)) @ np_deq_act(
          *np_quant_act(tiles(dy[s:e]), block, pow2)).T
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max())


def test_gradients_close_to_high_precision_ragged_dot():
  """As test_fp8's bound: dx rounds dy and w once each (~3.6%), dw rounds x twice and dy once (~4.3%):
  under 6e-2 for both, above 1e-2 so FP8 really ran. Per group relative error (scales differ by 1e3)."""
  N, K, F, block, group_sizes = CASES[1]
  x, w, dy = (jnp.asarray(t) for t in operands(N, K, F, len(group_sizes), seed=4))
  gs = jnp.asarray(group_sizes, jnp.int32)
  dx, dw = _grads(_ragged(group_sizes, block), x, w, dy)
  dx_ref, dw_ref = _grads(lambda x, w: jax.lax.ragged_dot(x, w, gs, precision="highest"), x, w, dy)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype
  for g, (s, e) in enumerate(bounds(group_sizes)):
    if e > s:
      assert 1e-2 < rel_fro(dx[s:e], dx_ref[s:e]) < 6e-2 and 1e-2 < rel_fro(dw[g], dw_ref[g]) < 6e-2, g


FP8 = FP8Config(enabled=True, block=16, impl="xla")  # the tiny model's dims are multiples of 16


def test_ragged_fp8_experts_match_the_einsum_fp8_experts(tiny):
  """The MoE layer with FP8 routed experts as grouped GEMMs (expert_gemm=ragged_dot), on one device and
  on an fsdp2 x ep2 x tp2 mesh, against the capacity-padded einsum FP8 path on one device. Forward and
  input gradients quantise per row alike: fp32 summation order apart. Expert weight gradients: on one
  device each expert's rows start a token tile in both layouts (equal but for summation order); on the
  mesh the ragged path packs both source shards' rows into one group, other tiles: within FP8 error."""
  ragged = dataclasses.replace(tiny.compute, fp8=FP8, expert_gemm="ragged_dot")
  einsum = dataclasses.replace(ragged, expert_gemm="einsum")
  assert expert_ffn.gemm_impl(ragged) == "ragged_dot" and expert_ffn.gemm_impl(einsum) == "einsum"
  boxed = moe.init(jax.random.key(0), tiny.model, ragged)
  x = jax.random.normal(jax.random.key(1), (8, 16, tiny.model.dim))

  def loss(p, x, compute):
    y, _ = moe.apply(p, x, tiny.model, compute)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  p = layers.unbox(boxed)
  (_, y_e), (pg_e, xg_e) = grad(p, x, einsum)
  (_, y_r), (pg_r, xg_r) = grad(p, x, ragged)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  with jax.set_mesh(mesh):
    (_, y_m), (pg_m, xg_m) = grad(jax.device_put(p, layers.shardings(boxed, mesh)), x, ragged)
  (_, y_hi), (pg_hi, _) = grad(p, x, tiny.compute)  # FP8 off: the fp32 layer
  assert np.abs(np.asarray(y_r) - np.asarray(y_hi)).max() > 1e-4  # FP8 really ran (measured 2e-3 of 0.035)
  # Measured: outputs and input gradients <= 1e-7 of their max apart, one-device weight gradients 5e-8.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())  # noqa: E731
  for got, want in ((y_r, y_e), (y_m, y_e), (xg_r, xg_e), (xg_m, xg_e)):
    close(np.asarray(got), np.asarray(want))
  for name in ("w_gate", "w_up", "w_down"):
    e, r, m, hi = (np.asarray(g["experts"][name]) for g in (pg_e, pg_r, pg_m, pg_hi))
    close(r, e)
    # FP8 error as in test_fp8_model: measured 0.018 between the layouts, 0.054 from the fp32 gradient.
    assert rel_fro(m, e) < 0.08 and rel_fro(m, hi) < 0.08, (name, rel_fro(m, e), rel_fro(m, hi))


def test_fp8_routed_experts_with_ragged_dot_validate():
  """Once refused (no FP8 grouped GEMM); now the ragged path has one, and auto stays einsum off TPU."""
  overrides = ["compute.fp8.enabled=true", "compute.fp8.block=16"]
  cfg = config.load("configs/tiny.yaml", overrides + ["compute.expert_gemm=ragged_dot"]).compute
  assert cfg.fp8.use("routed_experts") is cfg.fp8 and expert_ffn.gemm_impl(cfg) == "ragged_dot"
  auto = config.load("configs/tiny.yaml", overrides).compute
  assert expert_ffn.gemm_impl(auto) == ("ragged_dot" if jax.default_backend() == "tpu" else "einsum")


def test_dtypes_and_bad_shapes():
  x, w, gs = jnp.ones((8, 32), jnp.bfloat16), jnp.ones((2, 32, 64)), jnp.array([3, 4], jnp.int32)
  y, (dx, dw) = jax.jit(_ragged([3, 4], 32))(x, w), _grads(_ragged([3, 4], 32), x, w, jnp.ones((8, 64)))
  assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32 and y.shape == (8, 64)
  with pytest.raises(ValueError, match="multiples of block 32"):
    fp8.ragged.ragged_dot(jnp.ones((8, 48)), jnp.ones((2, 48, 64)), gs, block=32)
  with pytest.raises(ValueError, match=r"\[N, K\] and \[G, K, F\]"):
    fp8.ragged.ragged_dot(x, jnp.ones((2, 64, 64)), gs, block=32)
  with pytest.raises(ValueError, match="one per group"):
    fp8.ragged.ragged_dot(x, w, jnp.array([8], jnp.int32), block=32)
