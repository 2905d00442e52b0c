"""Frozen FP8 weights as DeepSeek ships V3/R1 (V3 report §3.3; inference/kernel.py): e4m3 values with one fp32
scale per block x block tile, held at one byte per weight for sampling and inference, and the forward GEMM
read straight from them. Inference only: nothing here has a weight gradient; train from a plain import."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax.config import ConfigError
from r1jax.nn.fp8.gemm import Impl, gemm_nt, resolve_impl, weight_nt
from r1jax.nn.fp8.quantize import E4M3, dequantize_weight, quantize_act


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A weight [..., K, N] ~= q * scale, one scale per tile (DeepSeek's `weight_scale_inv`, transposed to r1jax's
  [in, out]). Leading axes (layers, experts) are shared by both arrays."""

  q_KxN: jax.Array  # float8_e4m3fn [..., K, N]
  scale_KbxNb: jax.Array  # float32 [..., K / block, ceil(N / block)]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.q_KxN.shape


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q_KxN", "scale_KbxNb"], meta_fields=[])


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedWeight)


def abstract(shape: tuple[int, ...], block: int) -> QuantizedWeight:
  """ShapeDtypeStructs of a kept weight of `shape` in block x block tiles (a last partial block of output
  columns has its own scale)."""
  *lead, K, N = shape
  return QuantizedWeight(jax.ShapeDtypeStruct(tuple(shape), E4M3),
                         jax.ShapeDtypeStruct((*lead, K // block, -(-N // block)), jnp.float32))


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shardings(weight: NamedSharding, w: QuantizedWeight) -> QuantizedWeight:
  """q in the weight's sharding; each scale dim split like the weight's where those mesh axes divide it (then
  every weight shard holds whole tiles and their scales), replicated where they do not."""
  scale_shape = w.scale_KbxNb.shape
  spec = tuple(weight.spec) + (None,) * (len(scale_shape) - len(weight.spec))
  fits = lambda e, n: n % math.prod(weight.mesh.shape[a] for a in _axes(e)) == 0  # noqa: E731
  scale = NamedSharding(weight.mesh, P(*(e if fits(e, n) else None for e, n in zip(spec, scale_shape))))
  return QuantizedWeight(weight, scale)


def dot(x_MxK, w: QuantizedWeight, block: int = 128, impl: Impl = "xla", pow2: bool = False):
  """x[..., K] @ w as fp8.dot's forward GEMM, with w's stored e4m3 values and scales in place of quantising a
  master weight (a last partial block of output columns zero-padded to a whole one, as fp8.dot does).
  Inference only: not differentiable (w frozen, no FP8 backward; training refuses these weights)."""
  impl = resolve_impl(impl, block=block)
  q_KxN, scale_KbxNb = jax.lax.stop_gradient(w.q_KxN), jax.lax.stop_gradient(w.scale_KbxNb)
  (K, N), Kb = q_KxN.shape, x_MxK.shape[-1] // block
  if x_MxK.shape[-1] != K or scale_KbxNb.shape != (Kb, -(-N // block)):
    raise ValueError(f"fp8.weights.dot: x {x_MxK.shape} @ e4m3 {q_KxN.shape} with scales {scale_KbxNb.shape} "
                     f"needs [{K}] inputs and {block}x{block} tiles (compute.fp8.block must match the checkpoint's)")
  xq_MxK, xs_MxKb = quantize_act(x_MxK.reshape(-1, K), block, pow2)
  q_KxNp = jnp.pad(q_KxN, ((0, 0), (0, -N % block)))
  y_MxNp = gemm_nt(xq_MxK, xs_MxKb, *weight_nt(q_KxNp, scale_KbxNb, block), block=block,
                       out_dtype=x_MxK.dtype, impl=impl, b_blocked=True)
  return y_MxNp[:, :N].reshape(*x_MxK.shape[:-1], N)


def dequantize(w: QuantizedWeight, dtype):
  """q * scale in `dtype` (frozen), the same values an import without keep_fp8 holds."""
  return jax.lax.stop_gradient(dequantize_weight(w.q_KxN, w.scale_KbxNb)).astype(dtype)


def cast(w, dtype):
  """w as a plain array of `dtype`: kept FP8 weights dequantised, others cast."""
  return dequantize(w, dtype) if is_quantized(w) else w.astype(dtype)


def dequantize_tree(tree, dtype):
  """`tree` with every QuantizedWeight dequantised to `dtype`; other leaves untouched."""
  return jax.tree.map(lambda w: dequantize(w, dtype) if is_quantized(w) else w, tree, is_leaf=is_quantized)


def first_quantized(tree) -> str | None:
  """The path ("a/b/c") of the first QuantizedWeight in `tree`, None if there is none."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
    if is_quantized(x):
      return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return None


def refuse_training(params):
  """keep_fp8 weights have no master copy to update: a one-line ConfigError if `params` holds any."""
  path = first_quantized(params)
  if path is not None:
    raise ConfigError(f"parameter {path} is a keep_fp8 e4m3 weight, which is for inference only: import without "
                      "keep_fp8 to train")
