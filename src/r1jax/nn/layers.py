"""Building blocks shared by every module: logically-named parameters, RMSNorm, SwiGLU, projections."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1jax import sharding
from r1jax.config import FP8Config
from r1jax.nn import fp8


@dataclasses.dataclass(frozen=True)
class Param:
  """A weight and the logical names of its dimensions (static), as created by an init function."""

  value: jax.Array  # or a fp8.weights.QuantizedWeight (a keep_fp8 import), named like the weight it stands for
  names: tuple[str | None, ...]


jax.tree_util.register_dataclass(Param, data_fields=["value"], meta_fields=["names"])


def is_param(x) -> bool:
  return isinstance(x, Param)


STACK_AXES = ("layers",)  # the leading axis of stacked identical layers: not a dimension of one weight


def is_matrix(p: Param) -> bool:
  """Two or more named dimensions besides the layer axis. AdamW decays these; norm gains, biases and the
  router's selection bias are vectors and are not decayed."""
  return sum(name not in STACK_AXES for name in p.names) >= 2


def normal(key, shape, names, std, dtype) -> Param:
  assert len(shape) == len(names), (shape, names)
  return Param(std * jax.random.normal(key, shape, dtype), tuple(names))


def ones(shape, names, dtype) -> Param:
  return Param(jnp.ones(shape, dtype), tuple(names))


def zeros(shape, names, dtype) -> Param:
  return Param(jnp.zeros(shape, dtype), tuple(names))


def stacked(init_fn, key, n: int):
  """Init `n` identical layers with a leading "layers" axis, so they run under `jax.lax.scan`."""
  boxed = jax.vmap(init_fn)(jax.random.split(key, n))
  return jax.tree.map(lambda p: Param(p.value, ("layers", *p.names)), boxed, is_leaf=is_param)


def unbox(tree):
  return jax.tree.map(lambda p: p.value, tree, is_leaf=is_param)


def shardings(tree, mesh):
  """NamedShardings for a tree of Params (abstract or concrete), via sharding.RULES; a QuantizedWeight gets
  one for its e4m3 values and one for its scales (fp8.weights.shardings)."""
  def one(p):
    s = sharding.named(mesh, p.names)
    return fp8.weights.shardings(s, p.value) if fp8.weights.is_quantized(p.value) else s
  return jax.tree.map(one, tree, is_leaf=is_param)


def rms_norm(x, w, eps: float):
  """RMSNorm with fp32 statistics; returns the input dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def dense(x, w, fp8_cfg: FP8Config | None = None):
  """x[..., K] @ w[K, N] in x's dtype: the one entry point for projections. With an FP8Config (see
  FP8Config.use), DeepSeek's block-scaled FP8 GEMM in both passes (nn/fp8/); a keep_fp8 weight (a
  QuantizedWeight) runs the forward GEMM from its stored e4m3 values (nn/fp8/weights.py)."""
  if fp8.weights.is_quantized(w):
    if fp8_cfg is None:
      raise ValueError(f"layers.dense: a keep_fp8 e4m3 weight {list(w.shape)} reached a matmul that compute.fp8 runs "
                       "in high precision: enable FP8 for its part or import without keep_fp8")
    return fp8.weights.dot(x, w, fp8_cfg.block, fp8_cfg.impl, fp8_cfg.pow2_scales)
  if fp8_cfg is not None:
    return fp8.dot(x, w, fp8_cfg.block, fp8_cfg.impl, fp8_cfg.pow2_scales)
  return jnp.einsum("...k,kn->...n", x, w.astype(x.dtype))


def dense_many(x, ws, fp8_cfg: FP8Config | None = None) -> list:
  """[x @ w for w in ws]. In FP8, where fp8.joins_columns allows, one GEMM over the concatenated weights, so x
  is quantised once (forward and wgrad) and the kernel gets one wider launch; separate `dense`s otherwise
  (bf16, keep_fp8 weights, or columns sharded by GSPMD)."""
  widths = [w.shape[-1] for w in ws]
  if fp8_cfg is None or any(map(fp8.weights.is_quantized, ws)) or not fp8.joins_columns(*widths, block=fp8_cfg.block):
    return [dense(x, w, fp8_cfg) for w in ws]
  return fp8.dots(x, ws, fp8_cfg.block, fp8_cfg.impl, fp8_cfg.pow2_scales)


def init_mlp(key, dim: int, hidden: int, std: float, dtype, names=("embed", "mlp")) -> dict:
  kg, ku, kd = jax.random.split(key, 3)
  return {
      "w_gate": normal(kg, (dim, hidden), names, std, dtype),
      "w_up": normal(ku, (dim, hidden), names, std, dtype),
      "w_down": normal(kd, (hidden, dim), names[::-1], std, dtype),
  }


def mlp(p: dict, x_NxD, fp8_cfg: FP8Config | None = None):
  """SwiGLU: down(silu(x W_gate) * (x W_up)). In FP8 with master weights whose gate and up join as one GEMM
  (dense_many), fp8.swiglu_mlp: the SwiGLU fused into the down GEMM's input quantisation."""
  ws = [p["w_gate"], p["w_up"], p["w_down"]]
  F = ws[0].shape[-1]
  kept = any(map(fp8.weights.is_quantized, ws))
  if fp8_cfg is not None and not kept and fp8.joins_columns(F, F, block=fp8_cfg.block):
    return fp8.swiglu_mlp(x_NxD, *ws, block=fp8_cfg.block, impl=fp8_cfg.impl, pow2=fp8_cfg.pow2_scales)
  gate, up = dense_many(x_NxD, ws[:2], fp8_cfg)
  return dense(jax.nn.silu(gate) * up, ws[2], fp8_cfg)


def embed(table_VxD, tokens_BxL, dtype):
  x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)
  return sharding.constrain(x_BxLxD, "batch", "seq", "act_embed")


def write_rows(cache_BxSx, new_BxTx, write_B):
  """cache[b, write_B[b] + t] = new[b, t]: each row of a KV cache writes at its own position."""
  zeros = (0,) * (cache_BxSx.ndim - 2)
  put = lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, *zeros))  # noqa: E731
  return jax.vmap(put)(cache_BxSx, new_BxTx, write_B)
