"""DeepSeek-V3's fine-grained FP8 quantisation (V3 report §3.3): e4m3 values, one fp32 scale per 1 x block
activation tile and per block x block weight tile, x ~= q * scale. The reference every implementation (the
XLA functions here, the one-pass Triton quantiser in kernels/) reproduces bitwise."""

from __future__ import annotations

import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn


E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepSeek's floor, so an all-zero tile gets a finite scale (inference/kernel.py)


def tile_scale(amax, pow2: bool):
  """max(amax, 1e-4) / 448 (as a product, see _cast); with pow2 rounded up to a power of two (exactly, via
  frexp), so re-quantising along another tiling loses less (V3 report §3.3.3: "integral power of 2")."""
  s = jnp.maximum(amax, AMAX_FLOOR) * jnp.float32(1.0 / E4M3_MAX)  # see _cast for why not / 448
  if not pow2:
    return s
  m, e = jnp.frexp(s)  # s = m * 2**e with m in [0.5, 1): a power of two exactly when m == 0.5
  return jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))


def _cast(x, scale):
  """e4m3(x * (1 / scale)), with scale = amax * fl(1/448). XLA rewrites divisions (x / s into x * (1/s),
  1 / (a / 448) into 448 / a) differently per fusion, so eager and jit disagreed by an fp32 ulp; these
  products it leaves alone, so every compilation and a numpy reference agree bitwise. Exact with pow2."""
  return (x * (1.0 / scale)).astype(E4M3)


def quantize_act(x_MxK, block: int = 128, pow2: bool = False):
  """(e4m3 q[..., M, K], fp32 scale[..., M, K/block]): one scale per row per `block` channels."""
  K = x_MxK.shape[-1]
  if K % block:
    raise ValueError(f"activation shape {x_MxK.shape}: last dim {K} must be a multiple of block {block}")
  x_blk = x_MxK.astype(jnp.float32).reshape(*x_MxK.shape[:-1], K // block, block)
  scale_MxKb = tile_scale(jnp.max(jnp.abs(x_blk), axis=-1), pow2)
  return _cast(x_blk, scale_MxKb[..., None]).reshape(x_MxK.shape), scale_MxKb


def quantize_weight(w_KxN, block: int = 128, pow2: bool = False):
  """(e4m3 q[..., K, N], fp32 scale[..., K/block, N/block]): one scale per `block` x `block` tile."""
  *lead, K, N = w_KxN.shape
  if K % block or N % block:
    raise ValueError(f"weight shape {w_KxN.shape}: both matrix dims must be multiples of block {block}")
  w_blk = w_KxN.astype(jnp.float32).reshape(*lead, K // block, block, N // block, block)
  scale_KbxNb = tile_scale(jnp.max(jnp.abs(w_blk), axis=(-3, -1)), pow2)
  return _cast(w_blk, scale_KbxNb[..., :, None, :, None]).reshape(w_KxN.shape), scale_KbxNb


def dequantize_act(q_MxK, scale_MxKb):
  """fp32 q * scale, the block inferred from the shapes."""
  Kb = scale_MxKb.shape[-1]
  q_blk = q_MxK.astype(jnp.float32).reshape(*q_MxK.shape[:-1], Kb, q_MxK.shape[-1] // Kb)
  return (q_blk * scale_MxKb[..., None]).reshape(q_MxK.shape)


def dequantize_weight(q_KxN, scale_KbxNb):
  """fp32 q * scale, each scale over its block x block tile (block = K / Kb); a last partial block of columns
  takes its tile's scale (DeepSeek's checkpoints round those scales up: V3's 576-wide kv_a has 5 blocks)."""
  *lead, K, N = q_KxN.shape
  Kb, Nb = scale_KbxNb.shape[-2:]
  block = K // Kb
  q = jnp.pad(q_KxN.astype(jnp.float32), [(0, 0)] * (len(lead) + 1) + [(0, Nb * block - N)])
  q_blk = q.reshape(*lead, Kb, block, Nb, block)
  return (q_blk * scale_KbxNb[..., :, None, :, None]).reshape(*lead, K, Nb * block)[..., :N]


def swiglu(gate, up, dtype):
  """silu(gate) * up in fp32, rounded once to `dtype`: the values quantize_swiglu quantises."""
  g = gate.astype(jnp.float32)
  return (g / (1.0 + jnp.exp(-g)) * up.astype(jnp.float32)).astype(dtype)


def swiglu_grad(gate, up, dh):
  """fp32 (d gate, d up) of swiglu for cotangent dh: silu'(g) = sig(g) (1 + g (1 - sig(g)))."""
  g, u, dh = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
  sig = 1.0 / (1.0 + jnp.exp(-g))
  return dh * (u * (sig * (1.0 + g * (1.0 - sig)))), dh * (g * sig)

