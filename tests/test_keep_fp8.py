"""keep_fp8: DeepSeek's FP8 checkpoints imported as e4m3 weights with their block scales (nn/fp8.weights.py), for
inference at one byte per weight, running the same FP8 forward as an import that dequantises (16x16 blocks here,
so that every tiny-model matmul, MLA's 48-wide kv_a included, is whole blocks)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fp8_checkpoint import build

from r1jax import model, sharding, train
from r1jax.batch import Batch
from r1jax.config import ConfigError, MeshConfig
from r1jax.interop import hf, hf_config, hf_weights
from r1jax.nn import fp8

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors.torch")

FP8_ON = ["compute.dtype=float32", "compute.fp8.enabled=true", "compute.fp8.block=16", "compute.fp8.impl=xla"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return build(tmp_path_factory.mktemp("keep_fp8"), (16, 16))


@pytest.fixture(scope="module")
def imported(ckpt):
  """(config, keep_fp8 params, dequantised params) on one device, FP8 on for every part."""
  cfg = hf.read_config(ckpt.fp8_dir, FP8_ON)
  return (cfg, hf.load_params(ckpt.fp8_dir, cfg.model, cfg.compute, keep_fp8=True),
          hf.load_params(ckpt.fp8_dir, cfg.model, cfg.compute))


def _kept(params):
  """{path: QuantizedWeight} of every kept weight."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=fp8.weights.is_quantized)[0]
  return {jax.tree_util.keystr(p): w for p, w in flat if fp8.weights.is_quantized(w)}


def _forward(params, tokens_BxL, cfg):
  """Logits of the training/prefill path and of a cached prefill (MLA's absorbed form reads wkv_b whole), for a
  RunConfig's model and compute sections."""
  B, L = tokens_BxL.shape
  cache = model.init_cache(cfg.model, cfg.compute, B, L)
  decoded = model.decode(params, cache, tokens_BxL, jnp.zeros((B,), jnp.int32), cfg.model, cfg.compute)
  return model.apply(params, tokens_BxL, cfg.model, cfg.compute).logits_BxLxV, decoded.logits_BxTxV


_forward_jit = jax.jit(_forward, static_argnames="cfg")


def test_kept_weights_are_the_checkpoints_bytes_and_scales(ckpt, imported):
  """Every FP8 tensor of the checkpoint is kept, its e4m3 bytes and weight_scale_inv bit for bit (transposed to
  r1jax's [in, out]); everything else equals the dequantising import."""
  cfg, kept, dequantised = imported
  info = hf_config.from_hf(hf.raw_config(ckpt.fp8_dir), quiet=True)[2]
  plan = hf_weights.plan(cfg.model, model.abstract(cfg.model, cfg.compute), info)
  by_path = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in leaf.path)): leaf for leaf in plan}
  ckpt_fp8 = {n for n, t in ckpt.tensors.items() if t.dtype == torch.float8_e4m3fn}
  seen = set()
  for path, w in _kept(kept).items():
    leaf = by_path[path]
    assert w.q_KxN.dtype == fp8.E4M3 and w.scale_KbxNb.dtype == jnp.float32
    q, scale = np.asarray(w.q_KxN).reshape(-1, *leaf.piece_shape), np.asarray(w.scale_KbxNb)
    scale = scale.reshape(-1, *scale.shape[-2:])
    for i, (layer, e) in enumerate(leaf.indices()):
      name = leaf.name(layer, e)
      want_q = ckpt.tensors[name].view(torch.uint8).numpy().T
      want_scale = ckpt.tensors[name[:-len("weight")] + "weight_scale_inv"].numpy().T
      np.testing.assert_array_equal(q[i].view(np.uint8), want_q, err_msg=name)
      np.testing.assert_array_equal(scale[i], want_scale, err_msg=name)
      seen.add(name)
  assert seen == ckpt_fp8 and len(_kept(kept)) == 31
  flat_kept = jax.tree.leaves(kept, is_leaf=fp8.weights.is_quantized)
  for x, y in zip(flat_kept, jax.tree.leaves(dequantised)):
    if not fp8.weights.is_quantized(x):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_forward_equals_the_dequantised_import(imported):
  """Requantising a dequantised weight gives back the checkpoint's e4m3 values exactly and its scales within an
  fp32 ulp (amax * fl(1/448) rounds), and the routed experts are requantised from the same dequantised values
  either way; so logits agree to fp32 rounding. The absorbed MLA decode reads the same dequantised wkv_b."""
  cfg, kept, dequantised = imported
  flat_deq = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(dequantised)[0]}
  for path, w in _kept(kept).items():
    x = flat_deq[path]
    q, scale = fp8.quantize_weight(x, 16)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(w.q_KxN).view(np.uint8), err_msg=path)
    np.testing.assert_allclose(scale, w.scale_KbxNb, rtol=2.5e-7, atol=0, err_msg=path)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.model.vocab_size)
  got, want = _forward_jit(kept, tokens, cfg), _forward_jit(dequantised, tokens, cfg)
  for g, ref in zip(got, want):
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))


def test_data_and_model_meshes(ckpt, imported):
  """On a data-only mesh the weights are replicated; on fsdp x expert x tensor the scales follow the weight's
  split where those axes divide them (wkv_b's 2 latent blocks over fsdp*expert=4 do not: replicated there).
  Both forwards equal the 1-device one up to fp32 summation order."""
  cfg, kept_one, _ = imported
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.model.vocab_size)
  want = _forward_jit(kept_one, tokens, cfg)[0]
  for mesh_cfg in [MeshConfig(data=8), MeshConfig(data=1, fsdp=2, expert=2, tensor=2)]:
    mesh = sharding.make_mesh(mesh_cfg)
    kept = hf.load_params(ckpt.fp8_dir, cfg.model, cfg.compute, mesh, keep_fp8=True)
    wkv_b, w_up = kept["dense_layers"]["attn"]["wkv_b"], kept["moe_layers"]["ffn"]["experts"]["w_up"]
    assert wkv_b.q_KxN.sharding.spec == sharding.spec("layers", "kv_lora", "heads")
    if mesh_cfg.tensor == 2:
      assert wkv_b.scale_KbxNb.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
      assert w_up.scale_KbxNb.sharding.spec == w_up.q_KxN.sharding.spec
    with jax.set_mesh(mesh):
      got = jax.jit(lambda p, t: model.apply(p, t, cfg.model, cfg.compute).logits_BxLxV)(
          kept, sharding.global_batch({"t": np.asarray(tokens)}, mesh)["t"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()), err_msg=str(mesh_cfg))


def test_dot_from_stored_tiles_equals_fp8_dot():
  """The kept GEMM with fp8.quantize_weight's own tiles is fp8.dot's forward, bit for bit."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 64))
  w = jax.random.normal(jax.random.key(1), (64, 48)) * 0.1
  qw = fp8.weights.QuantizedWeight(*fp8.quantize_weight(w, 16))
  np.testing.assert_array_equal(fp8.weights.dot(x, qw, 16), fp8.dot(x, w, 16))
  with pytest.raises(ValueError, match="compute.fp8.block must match"):
    fp8.weights.dot(x, qw, 32)


def test_weight_bytes_halve(imported):
  """Kept weights take 1 byte each plus one fp32 scale per 16x16 tile: 0.508x their bf16 bytes."""
  _, kept, _ = imported
  ws = list(_kept(kept).values())
  kept_bytes = sum(w.q_KxN.nbytes + w.scale_KbxNb.nbytes for w in ws)
  bf16_bytes = sum(np.prod(w.shape) * 2 for w in ws)
  assert 0.5 < kept_bytes / bf16_bytes < 0.51


def test_keep_fp8_needs_fp8_enabled(ckpt):
  with pytest.raises(ConfigError, match="keep_fp8 needs compute.fp8.enabled=true"):
    hf.import_hf(ckpt.fp8_dir, keep_fp8=True)


def test_kept_params_are_for_inference_only(ckpt, imported):
  """Training refuses them (while tracing the step), and so do export and a forward whose config runs a kept
  weight's matmul in high precision."""
  cfg, kept, _ = imported
  state = train.init_state(cfg, jax.random.key(0), None).replace(params=kept)
  tokens = jnp.zeros((2, 16), jnp.int32)
  batch = Batch(tokens, tokens, jnp.ones_like(tokens))
  with pytest.raises(ConfigError, match="keep_fp8 e4m3 weight, which is for inference only: import without keep_fp8"):
    jax.jit(train.sft_step)(state, batch)
  with pytest.raises(ConfigError, match="export_hf: parameter dense_layers/attn/wkv_a is a keep_fp8"):
    hf.export_hf(kept, cfg.model, cfg.compute, "/nonexistent")
  off = hf.read_config(ckpt.fp8_dir, FP8_ON + ["compute.fp8.attention=false"])
  with pytest.raises(ConfigError, match="parameter dense_layers/attn/wkv_a .* compute.fp8.attention=true"):
    model.apply(kept, tokens, off.model, off.compute)


def test_weights_that_do_not_fit_are_dequantised(ckpt, caplog):
  """Parts compute.fp8 leaves in high precision, and tiles other than compute.fp8.block, are dequantised as
  without keep_fp8, and named in one log line."""
  caplog.set_level(logging.INFO, logger="r1jax")
  cfg = hf.read_config(ckpt.fp8_dir, FP8_ON + ["compute.fp8.attention=false"])
  kept = _kept(hf.load_params(ckpt.fp8_dir, cfg.model, cfg.compute, keep_fp8=True))
  assert len(kept) == 16 and not any("attn" in p for p in kept)
  [line] = [r.message for r in caplog.records if "keep_fp8: dequantising" in r.message]
  assert "dense_layers/attn/wkv_a (compute.fp8.attention is off)" in line
  cfg = hf.read_config(ckpt.fp8_dir, FP8_ON + ["compute.fp8.block=32", "compute.fp8.attention=false"])
  with pytest.raises(ConfigError, match="nothing would be kept: .*blocks 16x16 differ from compute.fp8.block=32"):
    hf.load_params(ckpt.fp8_dir, cfg.model, cfg.compute, keep_fp8=True)  # a full-precision import where one byte was asked for


def test_partial_output_blocks_are_kept(tmp_path):
  """At 32 x 32 blocks MLA's 48-wide kv_a ends in a half block, whose scale the checkpoint rounds up (2 scales
  for 48 columns, as V3's 576-wide kv_a has 5). It is kept, bytes and scales as stored, and the kept GEMM
  zero-pads that block as fp8.dot does: logits equal the dequantising import's to fp32 rounding."""
  ckpt32 = build(tmp_path / "ckpt", (32, 32))
  cfg = hf.read_config(ckpt32.fp8_dir, FP8_ON + ["compute.fp8.block=32"])
  kept = hf.load_params(ckpt32.fp8_dir, cfg.model, cfg.compute, keep_fp8=True)
  dequantised = hf.load_params(ckpt32.fp8_dir, cfg.model, cfg.compute)
  wkv_a = kept["dense_layers"]["attn"]["wkv_a"]
  assert fp8.weights.is_quantized(wkv_a) and wkv_a.shape[-2:] == (128, 48) and wkv_a.scale_KbxNb.shape[-2:] == (4, 2)
  name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
  np.testing.assert_array_equal(np.asarray(wkv_a.q_KxN)[0].view(np.uint8), ckpt32.tensors[name].view(torch.uint8).numpy().T)
  np.testing.assert_array_equal(np.asarray(wkv_a.scale_KbxNb)[0],
                                ckpt32.tensors[name[:-len("weight")] + "weight_scale_inv"].numpy().T)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.model.vocab_size)
  for g, ref in zip(_forward_jit(kept, tokens, cfg), _forward_jit(dequantised, tokens, cfg)):
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))
