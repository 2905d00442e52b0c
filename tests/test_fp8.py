"""FP8 training GEMMs (V3 report §3.3) against an independent numpy version of DeepSeek's recipe: e4m3
values, scale = max(amax, 1e-4) / 448 per 1x128 activation tile and per 128x128 weight tile, products of
dequantised operands in float64, and the Triton kernel (interpreted on CPU) against the XLA formulation."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from r1jax.nn import fp8
from r1jax.nn.fp8.kernels.triton import Tiles

F8 = ml_dtypes.float8_e4m3fn
SMALL = Tiles(bm=32, bn=64, num_warps=4, num_stages=2, group_m=2)  # interpreter-sized kernel tiles


def np_scale(amax, pow2=False):
  """max(amax, 1e-4) / 448 as float32 multiplies by fl(1/448) (nn/fp8/quantize.py says why); pow2 rounds it up to
  2**ceil(log2(scale)), computed in float64."""
  s = np.maximum(amax, np.float32(1e-4)).astype(np.float32) * np.float32(1.0 / 448.0)
  return (2.0 ** np.ceil(np.log2(s.astype(np.float64)))).astype(np.float32) if pow2 else s


def np_cast(x, scale):
  """e4m3 of x times the float32 reciprocal of its scale (the recipe's division as nn/fp8/quantize.py computes it)."""
  return (x * (np.float32(1.0) / scale)).astype(F8)


def np_quant_act(x, block, pow2=False):
  """Row by row, `block` columns at a time (a last partial tile is its own tile): (e4m3 values, float32
  scales [rows, ceil(K/block)])."""
  x = np.asarray(x, np.float32)
  rows = x.reshape(-1, x.shape[-1])
  q = np.zeros(rows.shape, F8)
  scale = np.zeros((rows.shape[0], -(-rows.shape[1] // block)), np.float32)
  for j in range(scale.shape[1]):
    cols = slice(j * block, (j + 1) * block)
    scale[:, j] = np_scale(np.abs(rows[:, cols]).max(axis=1), pow2)
    q[:, cols] = np_cast(rows[:, cols], scale[:, j:j + 1])
  return q.reshape(x.shape), scale.reshape(*x.shape[:-1], -1)


def np_quant_weight(w, block, pow2=False):
  """Tile by tile over block x block, partial tiles at the edges included (DeepSeek's ceil-sized scales):
  (e4m3 values, float32 scales [ceil(K/block), ceil(N/block)])."""
  w = np.asarray(w, np.float32)
  q = np.zeros(w.shape, F8)
  scale = np.zeros((-(-w.shape[0] // block), -(-w.shape[1] // block)), np.float32)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
      scale[i, j] = np_scale(np.abs(w[tile]).max(), pow2)
      q[tile] = np_cast(w[tile], scale[i, j])
  return q, scale


def np_deq_act(q, scale, block=None):
  block = block or q.shape[-1] // scale.shape[-1]
  return q.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=-1)[..., :q.shape[-1]]


def np_deq_weight(q, scale, block=None):
  block = block or q.shape[0] // scale.shape[0]
  return q.astype(np.float64) * np.kron(scale.astype(np.float64), np.ones((block, block)))[:q.shape[0], :q.shape[1]]


def rel_fro(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def operands(M, K, N, seed=0, dtype=np.float32):
  """x ~ N(0, 1), w ~ N(0, 1/K), dy ~ N(0, 1): unit-scale outputs and gradients."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((M, K)).astype(dtype), (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype),
          rng.standard_normal((M, N)).astype(dtype))


@pytest.mark.parametrize("shape,block,pow2", [((3, 40, 256), 128, False), ((3, 40, 256), 128, True),
                                               ((17, 96), 32, False), ((17, 96), 32, True)])
def test_quantize_act_matches_numpy(shape, block, pow2):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal(shape) * rng.uniform(1e-3, 1e2, size=shape[:-1] + (1,))).astype(np.float32)
  x[0, ..., :block] = 0.0  # an all-zero tile takes the 1e-4 amax floor
  q, scale = fp8.quantize_act(jnp.asarray(x), block, pow2)
  q_np, scale_np = np_quant_act(x, block, pow2)
  assert q.dtype == fp8.E4M3 and scale.dtype == jnp.float32 and scale.shape == scale_np.shape
  np.testing.assert_array_equal(np.asarray(scale), scale_np)  # bitwise
  np.testing.assert_array_equal(np.asarray(q).astype(np.float32), q_np.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_act(q, scale)), np_deq_act(q_np, scale_np).astype(np.float32))


@pytest.mark.parametrize("shape,block,pow2", [((256, 384), 128, False), ((256, 384), 128, True), ((64, 96), 32, False)])
def test_quantize_weight_matches_numpy(shape, block, pow2):
  rng = np.random.default_rng(2)
  w = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 2, size=shape[1])).astype(np.float32)
  q, scale = fp8.quantize_weight(jnp.asarray(w), block, pow2)
  q_np, scale_np = np_quant_weight(w, block, pow2)
  np.testing.assert_array_equal(np.asarray(scale), scale_np)
  np.testing.assert_array_equal(np.asarray(q).astype(np.float32), q_np.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_weight(q, scale)),
                                np_deq_weight(q_np, scale_np).astype(np.float32))


def test_dequantize_weight_with_a_partial_last_column_block():
  """A checkpoint's weight whose output dim ends in a partial block (scales rounded up, DeepSeek's kv_a):
  each value times its tile's scale, against the Kronecker-product reference of the FP8 import tests."""
  from fp8_checkpoint import quantize, reference_dequant

  w = np.random.default_rng(4).standard_normal((64, 40)).astype(np.float32)
  q, scale = quantize(w, (16, 16))
  assert scale.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_weight(jnp.asarray(q), jnp.asarray(scale))),
                                reference_dequant(q, scale, (16, 16)))


def test_pow2_scales_are_powers_of_two_at_least_the_plain_scale():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((64, 512)) * rng.uniform(1e-6, 1e4, size=(64, 1))).astype(np.float32)
  plain = np.asarray(fp8.quantize_act(jnp.asarray(x), 128)[1])
  pow2 = np.asarray(fp8.quantize_act(jnp.asarray(x), 128, pow2=True)[1])
  mantissa, _ = np.frexp(pow2)
  assert (mantissa == 0.5).all()
  assert (pow2 >= plain).all() and (pow2 < 2 * plain).all()
  q = np.asarray(fp8.quantize_act(jnp.asarray(x), 128, pow2=True)[0]).astype(np.float32)
  assert np.isfinite(q).all() and np.abs(q).max() <= 448  # never above e4m3's range


def test_fine_grained_scaling_isolates_outliers():
  """One 1e5 outlier in some tiles: per-tensor scaling pushes every ordinary value (~1) into e4m3's
  subnormals (1e5/448 = 223 per unit), while 1x128 and 128x128 tiles without an outlier keep the
  ~2.6% relative error of 3 mantissa bits (RMS of a 2^-4 worst-case rounding)."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((64, 512)).astype(np.float32)
  x[::8, 5] = 1e5  # K block 0 of every 8th row
  clean = np.ones(x.shape, bool)
  clean[::8, :128] = False
  q, s = fp8.quantize_act(jnp.asarray(x))
  fine = rel_fro(np.asarray(fp8.dequantize_act(q, s))[clean], x[clean])
  st = np.float32(np.abs(x).max() / 448.0)
  per_tensor = rel_fro(((x / st).astype(F8).astype(np.float32) * st)[clean], x[clean])
  assert fine < 0.035 and fine < per_tensor / 3, (fine, per_tensor)

  w = rng.standard_normal((256, 384)).astype(np.float32)
  w[3, 7] = w[200, 300] = 1e5  # tiles (0, 0) and (1, 2)
  clean = np.ones(w.shape, bool)
  clean[:128, :128] = clean[128:, 256:] = False
  q, s = fp8.quantize_weight(jnp.asarray(w))
  fine = rel_fro(np.asarray(fp8.dequantize_weight(q, s))[clean], w[clean])
  st = np.float32(np.abs(w).max() / 448.0)
  per_tensor = rel_fro(((w / st).astype(F8).astype(np.float32) * st)[clean], w[clean])
  assert fine < 0.035 and fine < per_tensor / 3, (fine, per_tensor)


def test_dot_is_the_product_of_dequantised_operands():
  """fp32 output: only fp32 accumulation separates it from float64 (K = 256 terms: ~sqrt(K) * 2^-24,
  1e-5 leaves margin). bf16 output: one more rounding, at most 2^-8 relative per element."""
  x, w, _ = operands(96, 256, 384)
  ref = np_deq_act(*np_quant_act(x, 128)) @ np_deq_weight(*np_quant_weight(w, 128))
  y = np.asarray(fp8.dot(jnp.asarray(x), jnp.asarray(w)))
  assert y.dtype == np.float32 and rel_fro(y, ref) < 1e-5
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  xb_np, wb_np = np.asarray(xb, np.float32), np.asarray(wb, np.float32)
  ref = np_deq_act(*np_quant_act(xb_np, 128)) @ np_deq_weight(*np_quant_weight(wb_np, 128))
  y = np.asarray(fp8.dot(xb, wb))
  assert y.dtype == jnp.bfloat16
  err = np.abs(y.astype(np.float64) - ref)
  assert (err <= 2.0**-8 * np.abs(ref) + 1e-5 * np.abs(ref).max()).all(), err.max()


def test_partial_output_block_is_its_own_tile():
  """V3's kv_a projection is 576 = 4.5 blocks wide: the last 64 columns get their own weight scales (as in
  DeepSeek's ceil-sized checkpoint scales); the product equals float64 of the dequantised operands."""
  x, w, _ = operands(40, 256, 192, seed=11)
  w[:, 128:] *= 50.0  # the partial block's scale must come from its own columns only
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  xb_np, wb_np = np.asarray(xb, np.float32), np.asarray(wb, np.float32)
  ref = np_deq_act(*np_quant_act(xb_np, 128)) @ np_deq_weight(*np_quant_weight(wb_np, 128), 128)
  y = np.asarray(jax.jit(fp8.dot)(xb, wb)).astype(np.float64)
  assert y.shape == (40, 192)
  assert (np.abs(y - ref) <= 2.0**-8 * np.abs(ref) + 1e-5 * np.abs(ref).max()).all()


def test_dot_error_against_the_exact_product():
  """e4m3 keeps 3 mantissa bits: 2^-4 relative rounding at worst, ~2.5% RMS per operand, ~3.6% for the
  product of two rounded operands (sqrt 2). 5e-2 bounds it with margin; above 1e-2 shows fp8 ran."""
  x, w, _ = operands(128, 512, 256, seed=5)
  err = rel_fro(fp8.dot(jnp.asarray(x), jnp.asarray(w)), x.astype(np.float64) @ w.astype(np.float64))
  assert 1e-2 < err < 5e-2, err


def _grads(f, x, w, dy):
  """(dx, dw) of sum(f(x, w) * dy): the VJP with cotangent dy, jitted (one compile beats eager dispatch)."""
  return jax.jit(jax.grad(lambda x, w, dy: jnp.sum(f(x, w) * dy), argnums=(0, 1)))(x, w, dy)


def test_gradients_close_to_fp32_matmul():
  """dx rounds dy and w once each (~3.6% as the forward); dw rounds x twice (1x128 cached, then 128x1)
  and dy once, ~sqrt(3) * 2.5% = 4.3%: 6e-2 for both. M = 200 pads the tokens to whole 128 blocks."""
  x, w, dy = (jnp.asarray(t) for t in operands(200, 256, 384, seed=6))
  dx, dw = _grads(fp8.dot, x, w, dy)
  dx_ref, dw_ref = _grads(lambda x, w: jnp.matmul(x, w, precision="highest"), x, w, dy)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype
  assert 1e-2 < rel_fro(dx, dx_ref) < 6e-2 and 1e-2 < rel_fro(dw, dw_ref) < 6e-2


@pytest.mark.parametrize("N", [64, 80])
def test_backward_gemms_follow_the_recipe_exactly(N):
  """float64 numpy of V3 Figure 6: dgrad = deq(q_1x128(dy)) @ deq(q_128x128(w))^T; wgrad = deq(q(x^T))
  @ deq(q(dy^T))^T with x the cached fp8 activation dequantised, both in per-channel 128-token tiles.
  N = 80 ends in a partial output block (16 of 32 columns), scaled over its own columns in w and dy."""
  M, K, block = 100, 96, 32  # 100 tokens: the last token block is zero-padded
  x, w, dy = operands(M, K, N, seed=7)
  dx, dw = (np.asarray(g) for g in _grads(lambda x, w: fp8.dot(x, w, block=block), *map(jnp.asarray, (x, w, dy))))
  dx_ref = np_deq_act(*np_quant_act(dy, block), block) @ np_deq_weight(*np_quant_weight(w, block), block).T
  x_cached = np_deq_act(*np_quant_act(x, block)).astype(np.float32)
  pad = lambda t: np.concatenate([t, np.zeros((-M % block, t.shape[1]), np.float32)])  # noqa: E731
  dw_ref = np_deq_act(*np_quant_act(pad(x_cached).T, block)) @ np_deq_act(*np_quant_act(pad(dy).T, block)).T
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max())


@pytest.mark.parametrize("M,K,N,block,tiles", [(64, 256, 256, 128, SMALL),
                                               (50, 96, 96, 32, Tiles(16, 32, 4, 2, group_m=2))])
def test_triton_kernel_interpreted_equals_xla(M, K, N, block, tiles):
  """Same products and scales, different fp32 summation order: 1e-5. The second case pads rows to the
  tile (50 -> 64), and its 4 x 3 tile grid ends in a partial group of row tiles."""
  x, w, dy = (jnp.asarray(t) for t in operands(M, K, N, seed=8))
  xla = lambda x, w: fp8.dot(x, w, block=block)  # noqa: E731
  triton = lambda x, w: fp8.dot(x, w, block=block, impl="triton", tiles=tiles, interpret=True)  # noqa: E731
  y_x, y_p = np.asarray(jax.jit(xla)(x, w)), np.asarray(jax.jit(triton)(x, w))
  np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-5 * np.abs(y_x).max())
  for g_p, g_x in zip(_grads(triton, x, w, dy), _grads(xla, x, w, dy)):
    np.testing.assert_allclose(np.asarray(g_p), np.asarray(g_x), rtol=1e-5, atol=1e-5 * np.abs(g_x).max())


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_batched_dot_is_per_expert_dot(impl):
  E, C, K, N = 3, 24, 64, 96
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((E, C, K)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((E, K, N)) * np.array([1e-2, 1.0, 30.0])[:, None, None], jnp.float32)
  dy = jnp.asarray(rng.standard_normal((E, C, N)), jnp.float32)
  kw = {"block": 32, "impl": impl, "tiles": SMALL, "interpret": impl == "triton"}
  y = jax.jit(lambda x, w: fp8.batched_dot(x, w, **kw))(x, w)
  one = jax.jit(lambda x, w: fp8.dot(x, w, **kw))
  y_ref = jnp.stack([one(x[e], w[e]) for e in range(E)])
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6 * float(jnp.abs(y_ref).max()))
  gx, gw = _grads(lambda x, w: fp8.batched_dot(x, w, **kw), x, w, dy)
  one_grads = jax.jit(jax.grad(lambda x, w, dy: jnp.sum(fp8.dot(x, w, **kw) * dy), argnums=(0, 1)))
  for e in range(E):
    gx_e, gw_e = one_grads(x[e], w[e], dy[e])
    np.testing.assert_allclose(np.asarray(gx[e]), np.asarray(gx_e), rtol=1e-6, atol=1e-6 * float(jnp.abs(gx_e).max()))
    np.testing.assert_allclose(np.asarray(gw[e]), np.asarray(gw_e), rtol=1e-6, atol=1e-6 * float(jnp.abs(gw_e).max()))


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_joined_dots_equal_separate_dots(impl):
  """dots over [w1 | w2 | w3] (the last 40 wide: a partial block, padded) against one dot per weight: every
  output column sees the same tiles and K steps, so y and dw are bitwise the same; dx joins the dgrads as one
  K = sum(N) product instead of adding three bf16 results: within a few bf16 ulps of their size."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((40, 64)), jnp.bfloat16)
  ws = [jnp.asarray(rng.standard_normal((64, n)) * sc, jnp.bfloat16) for n, sc in ((32, 1.0), (64, 30.0), (40, 1e-2))]
  dys = [jnp.asarray(rng.standard_normal((40, w.shape[1])), jnp.bfloat16) for w in ws]
  kw = {"block": 32, "impl": impl, "tiles": SMALL, "interpret": impl == "triton"}

  def loss(f):
    return jax.jit(jax.value_and_grad(lambda x, ws: sum(jnp.sum(y.astype(jnp.float32) * dy)
                                                        for y, dy in zip(f(x, ws), dys)), argnums=(0, 1)))

  joined = jax.jit(lambda x, ws: fp8.dots(x, ws, **kw))(x, ws)
  separate = [jax.jit(lambda x, w: fp8.dot(x, w, **kw))(x, w) for w in ws]
  for a, b in zip(joined, separate):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  _, (dx_j, dws_j) = loss(lambda x, ws: fp8.dots(x, ws, **kw))(x, ws)
  _, (dx_s, dws_s) = loss(lambda x, ws: [fp8.dot(x, w, **kw) for w in ws])(x, ws)
  for a, b in zip(dws_j, dws_s):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  dx_j, dx_s = np.asarray(dx_j, np.float32), np.asarray(dx_s, np.float32)
  np.testing.assert_allclose(dx_j, dx_s, rtol=0, atol=3 * 2.0 ** -8 * np.abs(dx_s).max())


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_given_quantisation_of_gathered_rows(impl):
  """An MoE layer's FP8 dispatch: tokens quantised once (quantize_input), e4m3 rows and scales gathered like
  the tokens (duplicates, and the zero row for empty slots), handed to dot as x_quantized. Bitwise the GEMM of
  the gathered bf16 rows, forward and both gradients (dx flows back through the bf16 gather's transpose)."""
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.standard_normal((24, 64)) * np.exp2(rng.integers(-6, 6, (24, 1))), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(0, 25, 40))  # 24: the zero row
  dy = jnp.asarray(rng.standard_normal((40, 96)), jnp.bfloat16)
  kw = {"block": 32, "impl": impl, "tiles": SMALL, "interpret": impl == "triton"}
  pad = lambda x: jnp.concatenate([x, jnp.zeros((1, 64), x.dtype)])  # noqa: E731

  def given(x, w):
    q, s = fp8.quantize_input(pad(x), 32, impl, interpret=impl == "triton")
    return fp8.dot(pad(x)[idx], w, x_quantized=(q[idx], s[idx]), **kw)

  def plain(x, w):
    return fp8.dot(pad(x)[idx], w, **kw)

  np.testing.assert_array_equal(np.asarray(jax.jit(given)(x, w), np.float32),
                                np.asarray(jax.jit(plain)(x, w), np.float32))
  for a, b in zip(_grads(given, x, w, dy), _grads(plain, x, w, dy)):
    assert float(jnp.abs(a.astype(jnp.float32)).max()) > 0
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_weights_quantised_ahead(impl):
  """weight_tiles over stacked weights [L, E, K, N] (one pass, vmapped), sliced and handed to the GEMMs as
  w_tiles: bitwise what dots and swiglu_mlp quantise themselves, forward and every gradient (the master weights
  then only carry theirs); the tiles themselves are the recipe's (quantize_weight of the joined weights)."""
  L, E, D, F = 2, 2, 64, 96
  rng = np.random.default_rng(16)
  x = jnp.asarray(rng.standard_normal((40, D)), jnp.bfloat16)
  ws = [jnp.asarray(rng.standard_normal((L, E, *s)) * np.exp2(rng.integers(-4, 4, (L, E, 1, 1))), jnp.float32)
        for s in ((D, F), (D, F), (F, D))]
  kw = {"block": 32, "impl": impl, "tiles": SMALL, "interpret": impl == "triton"}
  ahead = {k: dict(block=32, impl=impl, interpret=impl == "triton") for k in ("gu", "down")}
  gu = jax.jit(lambda g, u: fp8.weight_tiles((g, u), **ahead["gu"]))(ws[0], ws[1])
  down = jax.jit(lambda w: fp8.weight_tiles((w,), **ahead["down"]))(ws[2])
  q, s = fp8.quantize_weight(jnp.concatenate(ws[:2], -1)[1, 0], 32)
  np.testing.assert_array_equal(np.asarray(gu.q_KxN[1, 0], np.float32), np.asarray(q, np.float32))
  np.testing.assert_array_equal(np.asarray(gu.s_KbxNb[1, 0]), np.asarray(s))
  np.testing.assert_array_equal(np.asarray(gu.q_NxK[1, 0], np.float32), np.asarray(q.T, np.float32))

  def check(f_ahead, f_self, w):
    loss = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda x, w: jnp.sum(jnp.sin(jnp.concatenate(f(x, w), -1).astype(jnp.float32))), argnums=(0, 1)))
    for a, b in zip(jax.tree.leaves(loss(f_ahead)(x, w)), jax.tree.leaves(loss(f_self)(x, w))):
      assert np.abs(np.asarray(a, np.float32)).max() > 0
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

  pick = lambda t, l, e: jax.tree.map(lambda a: a[l, e], t)  # noqa: E731
  for l, e in ((0, 1), (1, 0)):
    w = [a[l, e] for a in ws]
    check(lambda x, w: fp8.dots(x, w, w_tiles=pick(gu, l, e), **kw), lambda x, w: fp8.dots(x, w, **kw), w[:2])
    check(lambda x, w: [fp8.swiglu_mlp(x, *w, w_tiles=(pick(gu, l, e), pick(down, l, e)), **kw)],
          lambda x, w: [fp8.swiglu_mlp(x, *w, **kw)], w)
  with pytest.raises(ValueError, match="w_tiles"):
    fp8.dots(x, [ws[0][0, 0]], w_tiles=pick(gu, 0, 0), **kw)  # [gate | up]'s tiles for gate alone


def test_swiglu_grad_is_the_vjp_of_silu_times_up():
  """fp8.swiglu_grad against jax.vjp of silu(gate) * up in float64 (an independent derivation), over gates from
  -30 to 30 (sigmoid saturating both ways): fp32 rounding only."""
  rng = np.random.default_rng(14)
  g, u, dh = (rng.standard_normal((64, 32)) * sc for sc in (10.0, 1.0, 1.0))
  with jax.enable_x64():
    _, vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, jnp.asarray(g), jnp.asarray(u))
    want = [np.asarray(t) for t in vjp(jnp.asarray(dh))]
  for got, w in zip(fp8.swiglu_grad(*(jnp.asarray(t, jnp.float32) for t in (g, u, dh))), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), w, rtol=1e-5, atol=1e-6 * np.abs(w).max())


@pytest.mark.parametrize("impl,C", [("xla", 64), ("triton", 64), ("xla", 40)])
def test_batched_swiglu_mlp_is_per_expert_swiglu_mlp(impl, C):
  """The fused FP8 SwiGLU MLP vmapped over experts (its kernels under the batching rule) is it per expert, forward
  and all four gradients, given x's quantisation or not: bitwise at whole token blocks. At 40 rows (padded to
  64 for wgrad) XLA on CPU sums the batched and the single [gate | up] GEMM in a different order, a bf16 ulp of
  gate or up moves e4m3 codes of d[gate | up], and the gradients land 1.5-2% apart, both 6.1-6.6% from the
  fp32 MLP (as the composition of `dot`s is): bar 3%; mixing experts up or misplacing a tile would be O(1)."""
  E, D, F = 2, 64, 64
  rng = np.random.default_rng(15)
  x = jnp.asarray(rng.standard_normal((E, C, D)), jnp.bfloat16)
  ws = [jnp.asarray(rng.standard_normal(s) / 8, jnp.bfloat16) for s in ((E, D, F), (E, D, F), (E, F, D))]
  kw = {"block": 32, "impl": impl, "tiles": SMALL, "interpret": impl == "triton"}
  xq = fp8.quantize_input(x, 32, impl, interpret=impl == "triton")

  def loss(f):
    return jax.jit(jax.value_and_grad(lambda x, ws: jnp.sum(jnp.sin(f(x, ws).astype(jnp.float32))), argnums=(0, 1)))

  y = jax.jit(lambda x, ws: fp8.batched_swiglu_mlp(x, *ws, x_quantized=xq, **kw))(x, ws)
  _, batched = loss(lambda x, ws: fp8.batched_swiglu_mlp(x, *ws, x_quantized=xq, **kw))(x, ws)
  for e in range(E):
    one_y = jax.jit(lambda x, ws: fp8.swiglu_mlp(x, *ws, **kw))(x[e], [w[e] for w in ws])
    _, one = loss(lambda x, ws: fp8.swiglu_mlp(x, *ws, **kw))(x[e], [w[e] for w in ws])  # the experts' sum splits
    for a, b in zip(jax.tree.leaves((one_y, one)), jax.tree.leaves((y, batched))):
      a, b = np.asarray(a, np.float32), np.asarray(b[e], np.float32)
      assert np.abs(a).max() > 0
      if C % 32 == 0:
        np.testing.assert_array_equal(a, b)
      else:
        assert rel_fro(a, b) < 0.03


def test_jit_and_leading_dims():
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 256)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((256, 128)) / 16, jnp.bfloat16)
  y = jax.jit(fp8.dot)(x, w)
  assert y.shape == (2, 3, 5, 128) and y.dtype == jnp.bfloat16
  y_flat = np.asarray(fp8.dot(x.reshape(30, 256), w), np.float32)
  # Another compilation may order the fp32 sums differently: at most one bf16 ulp (2^-7 relative) apart.
  np.testing.assert_allclose(np.asarray(y, np.float32).reshape(30, 128), y_flat, rtol=2.0**-7, atol=1e-6)
  dx, dw = jax.jit(jax.grad(lambda x, w: fp8.dot(x, w).astype(jnp.float32).sum(), argnums=(0, 1)))(x, w)
  assert dx.shape == x.shape and dw.shape == w.shape and dx.dtype == dw.dtype == jnp.bfloat16


def test_shapes_not_divisible_by_block_raise():
  x = jnp.ones((8, 256))
  with pytest.raises(ValueError, match="100"):
    fp8.dot(jnp.ones((8, 100)), jnp.ones((100, 128)))
  assert fp8.dot(x, jnp.ones((256, 200))).shape == (8, 200)  # a partial output block is padded (see above)
  with pytest.raises(ValueError, match="must be a multiple of block"):
    fp8.quantize_act(jnp.ones((4, 96)), block=128)
  with pytest.raises(ValueError, match="multiples of block"):
    fp8.quantize_weight(jnp.ones((128, 96)), block=128)
  with pytest.raises(ValueError, match="K = x's last dim"):
    fp8.dot(x, jnp.ones((128, 128)))
  with pytest.raises(ValueError, match="E, M, K"):
    fp8.batched_dot(jnp.ones((2, 8, 128)), jnp.ones((3, 128, 128)))


def test_impl_choice_never_falls_back_silently():
  x, w = jnp.ones((8, 128)), jnp.ones((128, 128))
  if jax.default_backend() != "gpu":
    assert fp8.resolve_impl("auto") == "xla"
    for impl in ("triton", "mosaic_gpu"):
      with pytest.raises(ValueError, match="GPU kernel"):
        fp8.dot(x, w, impl=impl)
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="TPU kernel"):
      fp8.dot(x, w, impl="mosaic_tpu")
  with pytest.raises(ValueError, match="'auto', 'xla', 'mosaic_gpu', 'triton', 'mosaic_tpu'"):
    fp8.dot(x, w, impl="cublas")
