"""FP8 (compute.fp8) inside the model: the expert-parallel shard_map equals its own 1-device run, and the tiny
model trains to the same loss with FP8 on as off. The FP8 GEMM itself is tested in test_fp8.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, model, sharding, train
from r1jax.bench import ab
from r1jax.bench.batches import train_batch
from r1jax.config import ConfigError, FP8Config, MeshConfig
from r1jax.nn import fp8, layers, moe

FP8 = FP8Config(enabled=True, block=16, impl="xla")  # the tiny model's dims are multiples of 16


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=1, expert=8), MeshConfig(data=1, fsdp=2, expert=2, tensor=2)])
def test_fp8_experts_on_a_mesh_match_one_device(tiny, mesh_cfg):
  """Forward and input gradients: activation tiles are per row and weight tiles line up with the shards
  (F / tensor is whole blocks), so the sharded layer repeats the 1-device arithmetic up to fp32 summation
  order. Expert weight gradients contract over tokens in 128 x 1 tiles (V3 report Figure 6), and which tokens
  share a tile depends on the capacity layout (per source shard on the mesh, one buffer on one device):
  those match within FP8 error, and both stay within FP8 error of the fp32 gradient."""
  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, fp8=FP8)
  boxed = moe.init(jax.random.key(0), cfg, compute)
  x = jax.random.normal(jax.random.key(1), (8, 16, cfg.dim))

  def loss(p, x):
    y, stats = moe.apply(p, x, cfg, compute)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, y_one), g_one = grad(layers.unbox(boxed), x)
  with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
    p = jax.device_put(layers.unbox(boxed), layers.shardings(boxed, sharding.make_mesh(mesh_cfg)))
    (_, y), g = grad(p, x)
  y_bf = jax.jit(lambda p, x: moe.apply(p, x, tiny.model, tiny.compute)[0])(layers.unbox(boxed), x)
  assert np.abs(np.asarray(y_one) - np.asarray(y_bf)).max() > 1e-4  # FP8 really ran (it is not the fp32 layer)
  np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5)
  (p_g, x_g), (p_g1, x_g1) = g, g_one
  np.testing.assert_allclose(x_g, x_g1, rtol=1e-4, atol=1e-5)
  rel = lambda a, b: np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))  # noqa: E731
  high = lambda p, x: jnp.sum(jnp.sin(moe.apply(p, x, tiny.model, tiny.compute)[0]))  # noqa: E731
  _, (g_hi, _) = jax.jit(jax.value_and_grad(high, argnums=(0, 1)))(layers.unbox(boxed), x)
  for name in ("w_gate", "w_up", "w_down"):
    got, one, hi = p_g["experts"][name], p_g1["experts"][name], g_hi["experts"][name]
    assert rel(got, one) < 0.08 and rel(got, hi) < 0.08 and rel(one, hi) < 0.08, (name, rel(got, one), rel(one, hi))
  for name in ("router", "shared"):  # no token-tiled wgrad inside the shard_map: equal up to summation order
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_g[name], p_g1[name])


def test_expert_weights_quantised_once_per_step(tiny):
  """FP8Config.quantize_experts_once: the MoE stack's expert weights quantised once before the layer scan
  (block.scan, moe.with_expert_tiles) gives bitwise the loss and gradients of quantising them in every layer;
  under remat "dots" the scan no longer quantises them in the forward and again in the rematerialised forward:
  the jaxpr has the two expert-weight amax reductions ([gate | up], down) outside the scan instead of four in it."""
  cfg = dataclasses.replace(tiny.model, n_mtp=0, n_layers=2, n_dense_layers=0)
  once = dataclasses.replace(tiny.compute, fp8=FP8, remat="dots")
  per_layer = dataclasses.replace(once, fp8=dataclasses.replace(FP8, quantize_experts_once=False))
  params = layers.unbox(model.init_boxed(cfg, once, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)

  def loss_grad(c):
    return jax.value_and_grad(lambda p: jnp.sum(jnp.sin(model.apply(p, tokens, cfg, c).logits_BxLxV)))

  amaxes = [str(jax.make_jaxpr(loss_grad(c))(params)).count("reduce_max") for c in (per_layer, once)]
  assert amaxes[0] - amaxes[1] == 2, amaxes
  one, once = (jax.jit(loss_grad(c))(params) for c in (per_layer, once))
  assert float(jnp.abs(one[1]["moe_layers"]["ffn"]["experts"]["w_down"]).max()) > 0
  jax.tree.map(np.testing.assert_array_equal, one, once)


def test_expert_weights_quantised_once_on_a_mesh(tiny):
  """The same on a mesh that splits the experts, their FFN width (tensor) and their embed dim (FSDP): the tiles,
  quantised under GSPMD outside the expert shard_map (gate and up each where they lie), enter it split like the
  weights; bitwise the per-layer quantisation inside it."""
  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, fp8=FP8)
  boxed = layers.stacked(lambda k: moe.init(k, cfg, compute), jax.random.key(0), 2)
  x = jax.random.normal(jax.random.key(1), (8, 16, cfg.dim))

  def loss_grad(once: bool):
    def loss(stack, x):
      stack = moe.with_expert_tiles(stack, compute) if once else stack
      assert ("fp8_tiles" in stack["experts"]) == once
      return jnp.sum(jnp.sin(jax.lax.scan(lambda x, p: (x + moe.apply(p, x, cfg, compute)[0], None), x, stack)[0]))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  with jax.set_mesh(mesh):
    stack = jax.device_put(layers.unbox(boxed), layers.shardings(boxed, mesh))
    per_layer, once = (loss_grad(o)(stack, x) for o in (False, True))
  assert float(jnp.abs(once[1][0]["experts"]["w_down"]).max()) > 0
  jax.tree.map(np.testing.assert_array_equal, per_layer, once)


@pytest.mark.slow
def test_fp8_training_matches_high_precision_training(tiny):
  """Same seed and data, 60 steps of the tiny model (every FP8 matmul on, block 16): the final cross-entropy
  (mean of the last 10 steps) within 1% relative of the fp32-compute run, after learning well below ln(V).
  At lr 1e-3 the gap measured 0.13%; the tiny preset's lr 1e-2 makes both runs chaotic (gaps of 2-10%
  between any two perturbed runs), which says nothing about FP8. Both arms run as `bench fp8` runs them:
  compiled once from one state (bench/ab.py), each curve from its own init, on progressions."""
  run = dataclasses.replace(tiny, optim=dataclasses.replace(tiny.optim, lr=1e-3),
                            train=dataclasses.replace(tiny.train, batch_size=16, seq_len=32))
  low_cfg = dataclasses.replace(run, compute=dataclasses.replace(tiny.compute, fp8=FP8))
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    state = train.init_state(run, jax.random.key(0), mesh)
    batch = train_batch(run)
    high_arm, low_arm = (ab.compile_arm(c, state, batch, mesh) for c in (run, low_cfg))
    del state
    high, low = (np.array(ab.loss_curve(a, mesh, seed=0, steps=60)) for a in (high_arm, low_arm))
  V = tiny.model.vocab_size
  assert high[-10:].mean() < 0.6 * np.log(V), high  # it learned something, so the comparison means something
  assert abs(low[-10:].mean() / high[-10:].mean() - 1) < 0.01, (low[-10:], high[-10:])
  assert not np.array_equal(low, high)  # FP8 changed the arithmetic


def test_mla_with_a_partial_output_block(tiny):
  """Block 32: the kv_a projection is 48 wide (kv_lora 32 + rope 16, 1.5 blocks), padded to 2 blocks and
  cropped as for V3's 576. The output (two FP8 GEMMs deep, ~2.5% RMS rounding per operand) stays within 8%
  of the fp32 layer; a weight gradient crosses up to three FP8 dgrads before its own wgrad, ~sqrt(8) x 2.5% =
  7% RMS: 15%. A wrong crop or misplaced block would be off by O(1); above 1e-3 shows FP8 ran."""
  from r1jax.nn import attention, mla, rope

  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, fp8=dataclasses.replace(FP8, block=32))
  compute.validate_for(cfg)  # input dims are whole blocks; the 48-wide output is allowed
  assert (cfg.kv_lora_rank + cfg.qk_rope_head_dim) % 32 and compute.fp8.use("attention")
  p = layers.unbox(mla.init(jax.random.key(0), cfg, compute))
  x = jax.random.normal(jax.random.key(1), (2, 24, cfg.dim))
  cos, sin = rope.cos_sin(jnp.broadcast_to(jnp.arange(24), (2, 24)), cfg)

  def run(c):
    f = lambda p: jnp.sum(jnp.sin(mla.apply(p, x, cos, sin, attention.Mask(), cfg, c)))  # noqa: E731
    return jax.jit(jax.value_and_grad(f))(p), jax.jit(lambda p: mla.apply(p, x, cos, sin, attention.Mask(), cfg, c))(p)

  (_, g8), y8 = run(compute)
  (_, g32), y32 = run(tiny.compute)
  rel = lambda a, b: np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))  # noqa: E731
  assert 1e-3 < rel(y8, y32) < 0.08
  for name in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
    assert g8[name].shape == p[name].shape and 1e-3 < rel(g8[name], g32[name]) < 0.15, (name, rel(g8[name], g32[name]))


def test_remat_dots_keeps_fp8_gemms_as_it_keeps_bf16_dots():
  """Under remat "dots" the backward recomputes no per-token FP8 GEMM or its activation quantisation (a kernel
  is no dot_general, so the bf16 policy alone recomputed them all): as many dot_generals (the XLA formulation's
  K-block products) as without remat, and amax reductions but for each weight's, which the rematerialised
  forward redoes rather than keep 1 byte per parameter (fp8.WEIGHT_NAME); the backward reuses it. Per GEMM:
  x and w forward, dy rows and columns and x's requantisation backward. The per-expert GEMMs (batched, as
  bf16 expert einsums are) are recomputed: one more forward's worth of each."""
  from r1jax.nn import block

  w1, w2 = (jax.random.normal(k, (32, 32)) * 0.1 for k in jax.random.split(jax.random.key(0), 2))

  def count(dot, x, policy):
    f = lambda x, w1, w2: jnp.sum(dot(jax.nn.silu(dot(x, w1)), w2) ** 2)  # noqa: E731
    f = f if policy is None else jax.checkpoint(f, policy=policy)
    text = str(jax.make_jaxpr(jax.grad(f, argnums=(1, 2)))(x, w1, w2))
    return text.count("dot_general"), text.count("reduce_max")

  dots = block._REMAT_POLICIES["dots"]
  one = lambda x, w: fp8.dot(x, w, block=16)  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (32, 32))
  assert count(one, x, None) == (6, 10)  # 2 forward, 2 dgrad, 2 wgrad GEMMs; 2 x 5 quantisations
  assert count(one, x, dots) == (6, 12)  # + the 2 weights' again
  assert count(one, x, jax.checkpoint_policies.dots_with_no_batch_dims_saveable) == (8, 14)  # what it was
  batched = lambda x, w: fp8.batched_dot(x, jnp.broadcast_to(w, (2, *w.shape)), block=16)  # noqa: E731
  assert count(batched, jnp.stack([x, x]), dots) == (8, 14)


def test_remat_changes_no_fp8_number(tiny):
  """A scanned stack of two MoE layers (shared experts: `dot`s whose outputs and e4m3 residuals remat "dots"
  saves; routed experts: vmapped, recomputed) has the same output and gradients under remat "dots" and "full"
  as without remat, up to XLA's fusion of the recomputation (fp32 ulps). Naming an e4m3 value that the forward
  still reads made jax.checkpoint round it to NaN (fp8/dot.py forward's comment); this is the check."""
  from r1jax.nn import block

  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, fp8=FP8)
  stack = jax.tree.map(lambda *a: jnp.stack(a), *(layers.unbox(moe.init(k, cfg, compute)) for k in jax.random.split(
      jax.random.key(0), 2)))
  x = jax.random.normal(jax.random.key(1), (4, 16, cfg.dim))

  def grads(policy):
    body = lambda x, p: (x + moe.apply(p, x, cfg, compute)[0], None)  # noqa: E731
    body = body if policy is None else jax.checkpoint(body, policy=policy)
    loss = lambda stack, x: jnp.sum(jnp.sin(jax.lax.scan(body, x, stack)[0]))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(stack, x)

  ref = grads(None)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731
  for remat in ("dots", "full"):
    jax.tree.map(close, grads(block._REMAT_POLICIES[remat]), ref)


def test_dense_many_is_the_separate_gemms():
  """One FP8 GEMM over concatenated columns equals one GEMM per weight when every weight but the last ends
  on a block boundary (the same tiles and block products; fp32 operands, so only fp32 summation order
  differs, in dx's sum over both weights); otherwise the weights run separately, bitwise as `dense`."""
  fp8_cfg = FP8Config(enabled=True, block=16, impl="xla")
  x = jax.random.normal(jax.random.key(0), (2, 24, 32))
  for widths in ((32, 48), (48, 40), (40, 32)):  # joined, joined with a partial last block, separate
    ws = [jax.random.normal(k, (32, n)) * 0.2 for k, n in zip(jax.random.split(jax.random.key(1), 2), widths)]
    f_many = lambda x, ws: sum(jnp.sum(jnp.sin(y)) for y in layers.dense_many(x, ws, fp8_cfg))  # noqa: E731
    f_each = lambda x, ws: sum(jnp.sum(jnp.sin(layers.dense(x, w, fp8_cfg))) for w in ws)  # noqa: E731
    ys_many = jax.jit(lambda x, ws: layers.dense_many(x, ws, fp8_cfg))(x, ws)
    ys_each = jax.jit(lambda x, ws: [layers.dense(x, w, fp8_cfg) for w in ws])(x, ws)
    g_many, g_each = (jax.jit(jax.grad(f, argnums=(0, 1)))(x, ws) for f in (f_many, f_each))
    assert [y.shape for y in ys_many] == [(2, 24, n) for n in widths]
    for a, b in zip([*ys_many, *jax.tree.leaves(g_many)], [*ys_each, *jax.tree.leaves(g_each)]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert fp8.joins_columns(*widths, block=16) == (widths[0] % 16 == 0)


def test_mlp_with_the_swiglu_fused_into_its_quantisation():
  """layers.mlp in FP8 is fp8.swiglu_mlp: h = silu(gate) * up quantised straight from the [gate | up] GEMM output,
  rounded once; the composition of `dot`s it replaces rounds bf16 silu(gate), then h, before quantising.
  Where those roundings move h across an e4m3 rounding boundary (~1 in 16 elements) a code differs by one
  step, so the two are different FP8 roundings of one layer: measured 1-1.6% apart in y and 2.5-3.5% in the
  gradients over 4 seeds, each 5.5% (y) and 9-13% (gradients at block 16) from the fp32 layer. Bars: apart
  by under 0.4x their error to fp32, and the fused path no further from fp32 than the composition (+10%)."""
  fp8_cfg = FP8Config(enabled=True, block=16, impl="xla")
  p = layers.unbox(layers.init_mlp(jax.random.key(0), 32, 64, 0.2, jnp.float32))
  x = jax.random.normal(jax.random.key(10), (2, 24, 32)).astype(jnp.bfloat16)

  def unfused(p, x):
    gate, up = layers.dense_many(x, [p["w_gate"], p["w_up"]], fp8_cfg)
    return layers.dense(jax.nn.silu(gate) * up, p["w_down"], fp8_cfg)

  def run(f):
    loss = lambda p, x: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32)))  # noqa: E731
    return jax.jit(lambda p, x: (f(p, x), jax.grad(loss, argnums=(0, 1))(p, x)))(p, x)

  fused, composed, hi = (run(f) for f in (lambda p, x: layers.mlp(p, x, fp8_cfg), unfused,
                                          lambda p, x: layers.mlp(p, x.astype(jnp.float32))))
  for path in ([0], [1, 1], [1, 0, "w_gate"], [1, 0, "w_up"], [1, 0, "w_down"]):  # y, dx, the weight gradients
    f, c, h = (functools.reduce(lambda t, k: t[k], path, r) for r in (fused, composed, hi))
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))  # noqa: E731
    assert rel(f, c) < 0.4 * rel(c, h) and rel(f, h) < 1.1 * rel(c, h), (path, rel(f, c), rel(f, h), rel(c, h))


def test_fp8_dims_must_be_whole_blocks():
  with pytest.raises(ConfigError, match="compute.fp8.attention.*not multiples of compute.fp8.block=128"):
    config.load("configs/tiny.yaml", ["compute.fp8.enabled=true"])
  compute = config.load("configs/tiny.yaml", ["compute.fp8.enabled=true", "compute.fp8.block=16"]).compute
  assert compute.fp8.use("attention") is compute.fp8 and compute.fp8.use("mtp_proj") is compute.fp8
  assert config.load("configs/tiny.yaml", ["compute.fp8.block=16"]).compute.fp8.use("attention") is None


def test_fp8_blocks_must_survive_the_tensor_split(tiny):
  compute = dataclasses.replace(tiny.compute, fp8=dataclasses.replace(FP8, block=64))  # moe_inter_dim 64
  sharding.validate_mesh(tiny.model, compute, sharding.abstract_mesh({}))
  with pytest.raises(ConfigError, match="32 columns per device, not whole compute.fp8.block=64"):
    sharding.validate_mesh(tiny.model, compute, sharding.abstract_mesh({"expert": 2, "tensor": 2}))


def test_kernels_are_not_chosen_where_gspmd_would_replicate_them(monkeypatch):
  """A pallas_call has no partitioning rule: under a multi-device mesh outside shard_map `auto` takes the
  XLA formulation and an explicit kernel is refused. On one GPU: Mosaic GPU on Hopper, else Triton."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for hopper, kernel in ((True, "mosaic_gpu"), (False, "triton")):
    monkeypatch.setattr(fp8.gemm, "_hopper", lambda hopper=hopper: hopper)
    assert fp8.resolve_impl("auto") == kernel
    assert fp8.resolve_impl("auto", block=16) == "triton"  # below Mosaic GPU's smallest swizzle
    assert fp8.resolve_impl("auto", block=32) == "triton"  # Mosaic GPU's checked block is 128
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=8))):
      assert fp8.resolve_impl("auto") == "xla"
      with pytest.raises(ValueError, match="would run replicated"):
        fp8.resolve_impl(kernel)


def test_a_dequantised_fp8_checkpoint_requantises_to_itself():
  """Why import needs no keep_fp8: weights stored as e4m3 values times 128x128 block scales (DeepSeek's
  checkpoints), dequantised to float32, quantise back to the same e4m3 values, and to the same scales up to
  one fp32 rounding (448 * s * fl(1/448))."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(256, 384)).astype(np.float32) * rng.uniform(0.01, 3, size=(2, 1, 3, 1)).repeat(128, 1).repeat(
      128, 3).reshape(256, 384)
  q, s = fp8.quantize_weight(jnp.asarray(w))  # a checkpoint as DeepSeek ships it
  again_q, again_s = fp8.quantize_weight(fp8.dequantize_weight(q, s))
  np.testing.assert_allclose(np.asarray(again_s), np.asarray(s), rtol=2.0**-22, atol=0)
  np.testing.assert_array_equal(np.asarray(again_q, np.float32), np.asarray(q, np.float32))
