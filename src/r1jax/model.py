"""The DeepSeek-V3 transformer: embed -> first-k dense blocks -> MoE blocks -> norm -> head, plus MTP.

Shape key, one meaning per letter: B batch, L length, S cache slots, T tokens (B*L), D model dim, H heads, Hkv
key/value heads, Dh head dim, Dn/Dr/Dv MLA's no-rope/rope/value head dims, R latent rank, F FFN width, V vocab,
E routed experts, K top-k (experts per token), G expert groups, C capacity (rows per expert), N stacked layers
(the scan axis), P MTP depth. nn/fp8 keeps the GEMM key of its own docstrings (M x K @ K x N, b a block).
Params are a plain dict pytree; identical blocks are stacked on a leading axis and run with lax.scan.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig, ConfigError, ModelConfig
from r1jax.nn import attention, block, fp8, layers, moe, mtp, rope
from r1jax.sharding import constrain


class Output(NamedTuple):
  logits_BxLxV: jax.Array | None  # fp32; None when apply(logits=False) (training losses run the head in chunks)
  mtp_logits_PxBxLxV: jax.Array | None  # depth k (1-based) at position i predicts token i+k+1
  # {"moe_layers": stats, "mtp": stats}; stats = {"load": [N, E] real (token, slot) pairs per expert,
  # "aux_loss": [N], "dropped_pairs": [N], "replay_differs": [N] real tokens whose replayed experts differ
  # from the router's own choice, "experts": [N, B, L, K] each token's experts (for routing replay)}
  router: dict
  hidden_BxLxD: jax.Array  # last hidden state after the final norm: what the head and MTP read
  mtp_hidden_PxBxLxD: jax.Array | None  # each MTP depth's state after its norm: what its head logits read


def init_boxed(cfg: ModelConfig, compute: ComputeConfig, key) -> dict:
  """Params wrapped in layers.Param (value + logical axis names)."""
  k_embed, k_dense, k_moe, k_head, k_mtp = jax.random.split(key, 5)
  dt = jnp.dtype(compute.param_dtype)
  p = {"embed": layers.normal(k_embed, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), compute.init_std, dt)}
  if cfg.n_dense_layers:
    p["dense_layers"] = layers.stacked(functools.partial(block.init, cfg=cfg, compute=compute, is_moe=False),
                                       k_dense, cfg.n_dense_layers)
  if cfg.n_moe_layers:
    p["moe_layers"] = layers.stacked(functools.partial(block.init, cfg=cfg, compute=compute, is_moe=True),
                                     k_moe, cfg.n_moe_layers)
  p["final_norm"] = layers.ones((cfg.dim,), ("norm",), dt)
  if not cfg.tie_embeddings:
    p["head"] = layers.normal(k_head, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), compute.init_std, dt)
  if cfg.n_mtp:
    p["mtp"] = layers.stacked(functools.partial(mtp.init, cfg=cfg, compute=compute), k_mtp, cfg.n_mtp)
  return p


def abstract(cfg: ModelConfig, compute: ComputeConfig = ComputeConfig()) -> dict:
  """Boxed params as ShapeDtypeStructs: shapes, dtypes and logical names with no allocation (shapes and names
  are the architecture's alone; dtypes are compute.param_dtype)."""
  return jax.eval_shape(functools.partial(init_boxed, cfg, compute), jax.random.key(0))


def param_shardings(cfg: ModelConfig, compute: ComputeConfig, mesh) -> dict:
  return layers.shardings(abstract(cfg, compute), mesh)


def init(cfg: ModelConfig, compute: ComputeConfig, key, mesh=None) -> dict:
  """Materialise params directly in their shardings on `mesh` (no host-side full copy)."""
  fn = lambda k: layers.unbox(init_boxed(cfg, compute, k))  # noqa: E731
  if mesh is None:
    return jax.jit(fn)(key)
  return jax.jit(fn, out_shardings=param_shardings(cfg, compute, mesh))(key)


def apply(params: dict, tokens_BxL, cfg: ModelConfig, compute: ComputeConfig, *, positions_BxL=None,
          segment_ids_BxL=None, token_mask_BxL=None, routes: dict | None = None, logits: bool = True) -> Output:
  """Forward pass. `positions`/`segment_ids` describe packed sequences (default: one sequence per row);
  `token_mask` marks real tokens (default: all), the only ones router statistics count. `routes` replays
  routing: {"moe_layers": [N, B, L, K], "mtp": [n_mtp, B, L, K]} expert ids, e.g. a previous
  `Output.router[...]["experts"]`; gates are still recomputed from the current weights. `logits=False`
  returns the normed states only (losses.head_logprobs runs the head on them chunk by chunk)."""
  chex.assert_rank(tokens_BxL, 2)
  chex.assert_type(tokens_BxL, int)
  check_fp8_params(params, compute)
  B, L = tokens_BxL.shape
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  mask = attention.Mask(segment_ids_BxL)  # None: one causal sequence per row (no segment work at all)
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.zeros((B, L), jnp.int32)
  if token_mask_BxL is None:
    token_mask_BxL = jnp.ones((B, L), jnp.int32)
  chex.assert_equal_shape([tokens_BxL, positions_BxL, segment_ids_BxL, token_mask_BxL])
  routes = routes or {}
  tokens_BxL = constrain(tokens_BxL, "batch", "seq")
  ctx = block.Context(*rope.cos_sin(positions_BxL, cfg), mask, moe.Tokens(token_mask_BxL, segment_ids_BxL))
  embed_fn, head = _embed_fn(params, compute), head_fn(params, cfg)
  x_BxLxD = embed_fn(tokens_BxL)
  router = {}
  if cfg.n_dense_layers:
    x_BxLxD, _ = block.scan(params["dense_layers"], x_BxLxD, ctx, cfg, compute, is_moe=False)
  if cfg.n_moe_layers:
    x_BxLxD, router["moe_layers"] = block.scan(params["moe_layers"], x_BxLxD, ctx, cfg, compute, is_moe=True,
                                               replay_NxBxLxK=routes.get("moe_layers"))
  h_BxLxD = layers.rms_norm(x_BxLxD, params["final_norm"], cfg.norm_eps)
  mtp_h = None
  if cfg.n_mtp:  # MTP reads the normed state, as engines serving DeepSeek's MTP weights do (mtp.py)
    mtp_h, router["mtp"] = mtp.apply(params["mtp"], h_BxLxD, tokens_BxL, embed_fn, ctx, cfg, compute,
                                        routes.get("mtp"))
  if not logits:
    return Output(None, None, router, h_BxLxD, mtp_h)
  return Output(head(h_BxLxD), None if mtp_h is None else head(mtp_h), router, h_BxLxD, mtp_h)


def _embed_fn(params: dict, compute: ComputeConfig):
  return lambda tokens: layers.embed(params["embed"], tokens, jnp.dtype(compute.dtype))


def head_fn(params: dict, cfg: ModelConfig):
  """The output head, h [..., B, L, D] -> fp32 logits; it stays fp32 (V3 report §3.3.1)."""
  head_DxV = params["embed"].T if cfg.tie_embeddings else params["head"]

  def head(h):
    names = (None,) * (h.ndim - 3) + ("batch", "seq", "act_vocab")
    return constrain(layers.dense(h.astype(jnp.float32), head_DxV), *names)
  return head


class DecodeOutput(NamedTuple):
  logits_BxTxV: jax.Array  # fp32
  hidden_BxTxD: jax.Array  # after the final norm (what MTP drafts from)
  router: dict  # {"moe_layers": stats} as in Output.router, over the T new tokens
  cache: dict


_STACKS = ("dense_layers", "moe_layers")


def init_cache(cfg: ModelConfig, compute: ComputeConfig, B: int, S: int) -> dict:
  """Zero KV caches of S slots for B rows, one stacked cache per stack of blocks (and the MTP blocks),
  in the compute dtype, laid out by logical names (rows over the batch axes)."""
  counts = {"dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers, "mtp": cfg.n_mtp}
  names = block.cache_names(cfg)
  cache = {}
  for stack, n in counts.items():
    if n:
      one = block.init_cache(cfg, B, S, jnp.dtype(compute.dtype))
      cache[stack] = {k: constrain(jnp.broadcast_to(v, (n, *v.shape)), "layers", *names[k]) for k, v in one.items()}
  return cache


def decode_context(write_B, T: int, cfg: ModelConfig, token_mask_BxT=None) -> block.Context:
  """Positions write_B + [0, T) attending to every cache slot at or before their own."""
  positions_BxT = write_B[:, None] + jnp.arange(T, dtype=jnp.int32)
  if token_mask_BxT is None:
    token_mask_BxT = jnp.ones_like(positions_BxT)
  tokens = moe.Tokens(token_mask_BxT.astype(jnp.int32), jnp.zeros_like(positions_BxT))
  return block.Context(*rope.cos_sin(positions_BxT, cfg), attention.Mask(q_start_B=write_B), tokens, write_B)


def decode(params: dict, cache: dict, tokens_BxT, write_B, cfg: ModelConfig, compute: ComputeConfig,
           token_mask_BxT=None) -> DecodeOutput:
  """Run T new tokens per row at cache slots write_B + [0, T) (prefill: the prompt at 0; decode: one token),
  extending the caches. Row b sees its slots <= its own position, so slots beyond a row's length may hold
  anything: they are overwritten before they become visible. `token_mask` marks rows' real tokens (router
  statistics and expert capacity count only those)."""
  chex.assert_rank(tokens_BxT, 2)
  check_fp8_params(params, compute)
  ctx = decode_context(write_B, tokens_BxT.shape[1], cfg, token_mask_BxT)
  x_BxTxD = _embed_fn(params, compute)(constrain(tokens_BxT, "batch", "seq"))
  router, new_cache = {}, dict(cache)
  for stack in _STACKS:
    if stack in params:
      x_BxTxD, stats, new_cache[stack] = block.scan_cached(params[stack], x_BxTxD, cache[stack], ctx, cfg, compute,
                                                           is_moe=stack == "moe_layers")
      if stats is not None:
        router[stack] = stats
  h_BxTxD = layers.rms_norm(x_BxTxD, params["final_norm"], cfg.norm_eps)
  return DecodeOutput(head_fn(params, cfg)(h_BxTxD), h_BxTxD, router, new_cache)


def mtp_draft(params: dict, cache: dict, h_BxTxD, next_tokens_BxT, write_B, cfg: ModelConfig,
              compute: ComputeConfig):
  """The first MTP module as a one-token draft model (nn.mtp.draft); returns (logits_BxTxV, cache)."""
  ctx = decode_context(write_B, h_BxTxD.shape[1], cfg)
  logits, mtp_cache = mtp.draft(params["mtp"], h_BxTxD, next_tokens_BxT, cache["mtp"],
                                _embed_fn(params, compute), head_fn(params, cfg), ctx, cfg, compute)
  return logits, {**cache, "mtp": mtp_cache}


ROUTER_BIAS_PATHS = {"moe_layers": ("moe_layers", "ffn", "router", "bias"),
                     "mtp": ("mtp", "block", "ffn", "router", "bias")}  # keyed like Output.router


def _router_bias_paths(params: dict):
  """(router stats key, path) of every router bias present (softmax routers have none by default)."""
  for name, path in ROUTER_BIAS_PATHS.items():
    if name in params and "bias" in _get(params, path[:-1]):
      yield name, path


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path, value) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def update_router_bias(params: dict, router: dict, speed: float) -> dict:
  """Apply the aux-loss-free bias update (moe.update_bias) to every MoE layer from its observed load."""
  for name, path in _router_bias_paths(params):
    if name in router:  # a forward without MTP (RL) observes no MTP load
      params = _set(params, path, moe.update_bias(_get(params, path), router[name]["load"], speed))
  return params


def decay_mask(cfg: ModelConfig) -> dict:
  """True for the leaves AdamW decays: weight matrices, decided from logical names (layers.is_matrix)."""
  return jax.tree.map(layers.is_matrix, abstract(cfg), is_leaf=layers.is_param)


def trainable_mask(params: dict) -> dict:
  """True for gradient-trained leaves; router biases are updated by load, not by the optimizer."""
  mask = jax.tree.map(lambda _: True, params)
  for _, path in _router_bias_paths(params):
    mask = _set(mask, path, False)
  return mask


_PARTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "head")


def _keys(path) -> list:
  """Plain keys of a jax key path (or of a tuple of keys)."""
  return [getattr(k, "key", getattr(k, "name", k)) for k in path]


def _part(path) -> str:
  keys = _keys(path)
  if keys[0] == "embed":
    return "embedding"
  if keys[0] == "head":
    return "head"
  for key, part in [("experts", "routed_experts"), ("shared", "shared_experts"), ("router", "router"),
                    ("attn", "attention")]:
    if key in keys:
      return part
  return "dense_mlp" if "ffn" in keys else "norms"


def fp8_part(path) -> str | None:
  """The FP8Config part whose matmuls use this parameter (a key path or a tuple of keys); None for the
  embedding, head, router and norms, which stay high precision."""
  keys = _keys(path)
  if keys[:2] == ["mtp", "proj"]:
    return "mtp_proj"
  part = _part(path)
  return part if part in ("attention", "dense_mlp", "routed_experts", "shared_experts") else None


def check_fp8_params(params: dict, compute: ComputeConfig):
  """keep_fp8 weights (QuantizedWeight) run only in FP8 GEMMs: a one-line error naming the first one whose part
  compute.fp8 leaves in high precision."""
  for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=fp8.weights.is_quantized)[0]:
    part = fp8_part(path)
    if fp8.weights.is_quantized(x) and (part is None or compute.fp8.use(part) is None):
      fix = f"set compute.fp8.enabled=true and compute.fp8.{part}=true" if part else "import it without keep_fp8"
      raise ConfigError(f"parameter {'/'.join(map(str, _keys(path)))} is a keep_fp8 e4m3 weight but compute.fp8 runs "
                        f"its matmul in high precision: {fix}")


def per_layer(params: dict) -> dict:
  """`params` with each decoder stack (dense_layers, moe_layers) as a tuple of its layers, every layer's weights
  in arrays of their own: decode runs such a stack unrolled, and each GEMM reads its weight where it lies. From a
  stacked weight, the layer scan's slice is a copy on a GPU (XLA does not alias a dynamic slice into a GEMM
  operand): 133 copies, 49% of a bench-model decode step on an H100 (docs/perf.md). One pass over the weights,
  and a second copy of them while it is alive."""
  out = dict(params)
  for stack in _STACKS:
    if stack in params and not isinstance(params[stack], tuple):
      n = jax.tree.leaves(params[stack])[0].shape[0]
      out[stack] = tuple(jax.tree.map(lambda w, i=i: w[i], params[stack]) for i in range(n))
  return out


def fp8_weights(params: dict, compute: ComputeConfig) -> dict:
  """`params` with every matmul weight that compute.fp8 runs in FP8 (and whose input dim is whole blocks) as
  one-byte e4m3 with block x block scales (fp8.weights.QuantizedWeight, the tiles fp8.dot makes of it), for
  sampling: decode then reads half the bytes of bf16. One pass over the weights; other leaves unchanged, MLA's
  wkv_b too: the absorbed decode multiplies by it in the compute dtype (nn/mla.py), so e4m3 would only round it
  (7.5% of the tiny model's logits) and save no bytes."""
  block, pow2 = compute.fp8.block, compute.fp8.pow2_scales

  def one(path, w):
    part = fp8_part(path)
    if (fp8.weights.is_quantized(w) or part is None or not compute.fp8.use(part) or w.ndim < 2 or w.shape[-2] % block
        or "wkv_b" in _keys(path)):
      return w
    N = w.shape[-1]  # a last partial block of output columns gets its own scale, as in DeepSeek's checkpoints
    q, scale = fp8.quantize_weight(jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, -N % block)]), block, pow2)
    return fp8.weights.QuantizedWeight(q[..., :N], scale)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=fp8.weights.is_quantized)


def param_count(cfg: ModelConfig) -> dict:
  """Total and active (per-token) parameter counts with a per-part breakdown, from abstract shapes only.

  "total"/"active" exclude MTP modules (as DeepSeek reports 671B/37B); embedding and head count once each.
  """
  boxed = abstract(cfg)
  main = {k: v for k, v in boxed.items() if k != "mtp"}
  parts = dict.fromkeys(_PARTS, 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(main, is_leaf=layers.is_param)[0]:
    parts[_part(path)] += math.prod(leaf.value.shape)
  mtp_total = sum(math.prod(p.value.shape) for p in jax.tree.leaves(boxed.get("mtp", {}), is_leaf=layers.is_param))
  if cfg.tie_embeddings:
    parts["head"] = 0
  total = sum(parts.values())
  routed_frac = cfg.n_activated_experts / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
  active = total - parts["routed_experts"] + round(parts["routed_experts"] * routed_frac)
  return {"total": total, "active": active, "mtp": mtp_total, "total_with_mtp": total + mtp_total,
          "active_without_embedding": active - parts["embedding"], "parts": parts}
