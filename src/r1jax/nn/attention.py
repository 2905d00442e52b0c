"""Scaled dot-product attention for MLA and GQA: causal, within packed segments, or over a KV cache.

Implementations (ComputeConfig.attention_impl): "xla" is the reference (fp32 scores, an explicit mask; CPU);
"cudnn" is cuDNN's fused flash attention on NVIDIA GPUs for causal rows (one sequence per row; right padding
needs no segment ids: a causal real token never sees the padding after it); "splash" is Pallas splash attention
on TPU (segment ids natively); "blockwise" is flash attention's algorithm in plain JAX (nn/blockwise.py), on any
backend and any mesh. None of the three materialises a [B, L, L] mask. "auto" picks the fastest one that
honours the call: cudnn, then splash, then under context parallelism (where the kernels' causal masks do not
know a shard's query offset) blockwise, else xla. An explicit choice that cannot honour it is a ConfigError.
Decoding over a cache (and the sampler's prefill into one) always takes the xla path, whatever the choice: it
is the training setting. Packed
rows on GPU take the xla path too: cuDNN's packed layout (q/kv offsets) asked for 460 GiB at 8 x 2048 with room
for L segments per row. Splash is a pallas_call, which GSPMD cannot partition: on a mesh it runs per device
under shard_map (batch and heads split as sharding.RULES says).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax import sharding
from r1jax.config import ConfigError
from r1jax.nn import blockwise

try:  # private in JAX 0.10/0.11; the public jax.nn.dot_product_attention needs equal q/k/v head dims
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn
except ImportError:  # pragma: no cover
  _cudnn = None


class Mask(NamedTuple):
  """Which keys a query sees. Training (q_start_B None, S == L): causal, and within segments when
  `segment_ids_BxL` is given (packed rows; padding is a segment of its own). Over a cache (q_start_B given:
  the sampler's prefill and decode steps): query t of row b sits at position q_start_B[b] + t and sees the
  cache slots at or before it."""

  segment_ids_BxL: jax.Array | None = None
  q_start_B: jax.Array | None = None


def attend(q_BxLxHxDk, k_BxSxHkvxDk, v_BxSxHkvxDv, mask: Mask, *, scale: float, impl: str = "auto",
           block: int = 512):
  """Softmax(q k^T * scale) v over the keys `mask` allows, H // Hkv query heads per key/value head (`block`:
  keys per step of blockwise attention). Returns o_BxLxHxDv in q's dtype."""
  segment_ids_BxL, q_start_B = mask
  name = choose(impl, q_BxLxHxDk, v_BxSxHkvxDv, decoding=q_start_B is not None, packed=segment_ids_BxL is not None)
  if name == "cudnn":
    return _cudnn.dot_product_attention(q_BxLxHxDk, k_BxSxHkvxDk, v_BxSxHkvxDv, scale=scale,
                                        mask_type=_cudnn.MaskType.CAUSAL)
  if name == "splash":
    return _splash_attend(q_BxLxHxDk, k_BxSxHkvxDk, v_BxSxHkvxDv, scale, segment_ids_BxL)
  if name == "blockwise":
    return blockwise.attend(q_BxLxHxDk, k_BxSxHkvxDk, v_BxSxHkvxDv, scale, segment_ids_BxL, block)
  return xla_attend(q_BxLxHxDk, k_BxSxHkvxDk, v_BxSxHkvxDv, scale, segment_ids_BxL, q_start_B)


def choose(impl: str, q_BxLxHxDk, v_BxSxHkvxDv, decoding: bool, packed: bool = False) -> str:
  """The implementation that runs this call; "auto" tries cudnn (GPU), splash (TPU), then blockwise under
  context parallelism, else xla. Attention over a cache is always xla (the choice is for training)."""
  candidates = {"auto": ("cudnn", "splash"), "cudnn": ("cudnn",), "splash": ("splash",), "xla": (),
                "blockwise": ()}.get(impl)
  if candidates is None:
    raise ConfigError(f"compute.attention_impl={impl!r}: expected one of auto, xla, cudnn, splash, blockwise")
  if impl in ("xla", "blockwise") or decoding:
    return "xla" if decoding else impl
  reasons = []
  for name in candidates:
    reason = _unsupported(name, q_BxLxHxDk, v_BxSxHkvxDv, packed)
    if reason is None:
      return name
    reasons.append(f"{name}: {reason}")
  if impl == "auto":
    mesh = jax.sharding.get_abstract_mesh()
    return "blockwise" if not mesh.empty and sharding.context_size(mesh) > 1 else "xla"
  raise ConfigError(f"compute.attention_impl={impl!r} cannot run this attention ({'; '.join(reasons)}); "
                    "use auto or xla")


def _unsupported(name: str, q, v, packed: bool) -> str | None:
  """Why `name` cannot compute this call exactly, or None if it can."""
  backend = jax.default_backend()
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and sharding.context_size(mesh) > 1:
    return "context parallelism (a shard's queries start mid-sequence; the kernel's causal mask assumes they do not)"
  if name == "cudnn":
    if backend != "gpu" or _cudnn is None:
      return f"needs an NVIDIA GPU with cuDNN (backend is {backend})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      return f"needs bf16/fp16 inputs, got {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > 256 or q.shape[-1] % 8 or v.shape[-1] % 8:
      return f"head dims {q.shape[-1]}/{v.shape[-1]} must be multiples of 8 and <= 256"
    if packed:
      return "packed segment ids (see the module note)"
    return None
  if backend != "tpu":
    return f"needs a TPU (backend is {backend})"
  if q.shape[1] % 128:
    return f"sequence length {q.shape[1]} must be a multiple of 128"
  return None


def xla_attend(q_BxLxHxDk, k_BxSxHkvxDk, v_BxSxHkvxDv, scale: float, segment_ids_BxL=None, q_start_B=None):
  """The reference: fp32 scores and softmax over an explicit [B, L, S] mask; query heads are grouped per
  key/value head (head h reads kv head h // (H / Hkv), as HF), never copied."""
  B, L, H, Dk = q_BxLxHxDk.shape
  S, Hkv = k_BxSxHkvxDk.shape[1], k_BxSxHkvxDk.shape[2]
  f32 = jnp.float32
  q_BxLxHkvxGqxDk = q_BxLxHxDk.reshape(B, L, Hkv, H // Hkv, Dk)
  scores = jnp.einsum("blkgd,bskd->bkgls", q_BxLxHkvxGqxDk, k_BxSxHkvxDk, preferred_element_type=f32) * scale
  mask_BxLxS = visible(L, S, segment_ids_BxL, q_start_B)
  scores = jnp.where(mask_BxLxS[:, None, None], scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxHkvxDv.dtype)
  o_BxLxHkvxGqxDv = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxHkvxDv)
  return o_BxLxHkvxGqxDv.reshape(B, L, H, v_BxSxHkvxDv.shape[-1]).astype(q_BxLxHxDk.dtype)


def visible(L: int, S: int, segment_ids_BxL=None, q_start_B=None):
  """[B, L, S] (or [1, L, S]) bool: which keys each query may attend to."""
  if q_start_B is not None:
    positions_BxL = q_start_B[:, None] + jnp.arange(L, dtype=jnp.int32)
    return jnp.arange(S)[None, None, :] <= positions_BxL[:, :, None]
  mask = jnp.tril(jnp.ones((L, S), jnp.bool_))[None]
  if segment_ids_BxL is not None:
    mask = mask & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
  return mask


@functools.cache
def _splash_kernel(L: int, H: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(H)])
  return sk, sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attend(q, k, v, scale: float, segment_ids_BxL, interpret: bool = False):
  """Splash attention (TPU): causal block sparsity plus segment ids; kv heads repeated for GQA. On a mesh it
  runs per device under shard_map: a pallas_call has no partitioning rule, so GSPMD would replicate it."""
  B, L, H, _ = q.shape
  groups = H // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  seg_BxL = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
  local = functools.partial(_splash_local, scale=scale, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return local(q, k, v, seg_BxL)
  qkv, seg = sharding.spec("batch", "seq", "act_heads", None), sharding.spec("batch", "seq")
  return jax.shard_map(local, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False)(q, k, v, seg_BxL)


def _splash_local(q, k, v, seg_BxL, *, scale: float, interpret: bool):
  B, L, H, _ = q.shape
  sk, kernel = _splash_kernel(L, H, interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, L, D]
  run = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1))  # noqa: E731
  o_BxHxLxDv = jax.vmap(run)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), seg_BxL)
  return heads_first(o_BxHxLxDv).astype(q.dtype)
