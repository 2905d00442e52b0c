"""The DeepSeek-V3 transformer: embed -> first-k dense blocks -> MoE blocks -> norm -> head, plus MTP.

Shape key: B batch, L length, D model dim, H heads, E routed experts, K top-k, C capacity, V vocab,
G expert groups, T tokens (B*L), F FFN width, R latent rank, N stacked layers.
Params are a plain dict pytree; identical blocks are stacked on a leading axis and run with lax.scan.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.nn import block, layers, moe, mtp, rope
from r1jax.sharding import constrain


class Output(NamedTuple):
  logits_BxLxV: jax.Array  # fp32
  mtp_logits_NxBxLxV: jax.Array | None  # depth k (1-based) at position i predicts token i+k+1
  # {"moe_layers": stats, "mtp": stats}; stats = {"load": [N, E] real (token, slot) pairs per expert,
  # "aux_loss": [N], "dropped_pairs": [N], "experts": [N, B, L, K] each token's experts (for routing replay)}
  router: dict
  hidden_BxLxD: jax.Array  # last hidden state after the final norm: what the head and MTP read


def init_boxed(cfg: ModelConfig, key) -> dict:
  """Params wrapped in layers.Param (value + logical axis names)."""
  k_embed, k_dense, k_moe, k_head, k_mtp = jax.random.split(key, 5)
  dt = jnp.dtype(cfg.param_dtype)
  p = {"embed": layers.normal(k_embed, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg.init_std, dt)}
  if cfg.n_dense_layers:
    p["dense_layers"] = layers.stacked(functools.partial(block.init, cfg=cfg, is_moe=False), k_dense,
                                       cfg.n_dense_layers)
  if cfg.n_moe_layers:
    p["moe_layers"] = layers.stacked(functools.partial(block.init, cfg=cfg, is_moe=True), k_moe,
                                     cfg.n_moe_layers)
  p["final_norm"] = layers.ones((cfg.dim,), ("norm",), dt)
  if not cfg.tie_embeddings:
    p["head"] = layers.normal(k_head, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, dt)
  if cfg.n_mtp:
    p["mtp"] = layers.stacked(functools.partial(mtp.init, cfg=cfg), k_mtp, cfg.n_mtp)
  return p


def abstract(cfg: ModelConfig) -> dict:
  """Boxed params as ShapeDtypeStructs: shapes, dtypes and logical names with no allocation."""
  return jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0))


def param_shardings(cfg: ModelConfig, mesh) -> dict:
  return layers.shardings(abstract(cfg), mesh)


def init(cfg: ModelConfig, key, mesh=None) -> dict:
  """Materialise params directly in their shardings on `mesh` (no host-side full copy)."""
  fn = lambda k: layers.unbox(init_boxed(cfg, k))  # noqa: E731
  if mesh is None:
    return jax.jit(fn)(key)
  return jax.jit(fn, out_shardings=param_shardings(cfg, mesh))(key)


def attention_mask(segment_ids_BxL):
  """Causal mask restricted to each packed segment: [B, L, L] bool."""
  L = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((L, L), jnp.bool_))
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxL[None] & same_BxLxL


def apply(params: dict, tokens_BxL, cfg: ModelConfig, *, positions_BxL=None, segment_ids_BxL=None,
          token_mask_BxL=None, routes: dict | None = None) -> Output:
  """Forward pass. `positions`/`segment_ids` describe packed sequences (default: one sequence per row);
  `token_mask` marks real tokens (default: all), the only ones router statistics count. `routes` replays
  routing: {"moe_layers": [N, B, L, K], "mtp": [n_mtp, B, L, K]} expert ids, e.g. a previous
  `Output.router[...]["experts"]`; gates are still recomputed from the current weights."""
  chex.assert_rank(tokens_BxL, 2)
  chex.assert_type(tokens_BxL, int)
  B, L = tokens_BxL.shape
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.zeros((B, L), jnp.int32)
  if token_mask_BxL is None:
    token_mask_BxL = jnp.ones((B, L), jnp.int32)
  chex.assert_equal_shape([tokens_BxL, positions_BxL, segment_ids_BxL, token_mask_BxL])
  routes = routes or {}
  tokens_BxL = constrain(tokens_BxL, "batch", "seq")
  dtype = jnp.dtype(cfg.dtype)
  ctx = block.Context(*rope.cos_sin(positions_BxL, cfg), attention_mask(segment_ids_BxL),
                      moe.Tokens(token_mask_BxL, segment_ids_BxL))
  embed_fn = lambda t: layers.embed(params["embed"], t, dtype)  # noqa: E731
  head_DxV = params["embed"].T if cfg.tie_embeddings else params["head"]

  def head_fn(h_BxLxD):  # the output head stays fp32 (V3 report §3.3.1)
    logits = layers.dense(h_BxLxD.astype(jnp.float32), head_DxV)
    return constrain(logits, "batch", "seq", "act_vocab")

  x_BxLxD = embed_fn(tokens_BxL)
  router = {}
  if cfg.n_dense_layers:
    x_BxLxD, _ = block.scan(params["dense_layers"], x_BxLxD, ctx, cfg, is_moe=False)
  if cfg.n_moe_layers:
    x_BxLxD, router["moe_layers"] = block.scan(params["moe_layers"], x_BxLxD, ctx, cfg, is_moe=True,
                                               replay_NxBxLxK=routes.get("moe_layers"))
  h_BxLxD = layers.rms_norm(x_BxLxD, params["final_norm"], cfg.norm_eps)
  logits_BxLxV = head_fn(h_BxLxD)
  mtp_logits = None
  if cfg.n_mtp:  # MTP reads the normed state, as engines serving DeepSeek's MTP weights do (mtp.py)
    mtp_logits, router["mtp"] = mtp.apply(params["mtp"], h_BxLxD, tokens_BxL, embed_fn, head_fn, ctx, cfg,
                                          routes.get("mtp"))
  return Output(logits_BxLxV, mtp_logits, router, h_BxLxD)


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


def update_router_bias(params: dict, router: dict, cfg: ModelConfig) -> dict:
  """Apply the aux-loss-free bias update (moe.update_bias) to every MoE layer from its observed load."""
  for name, path in _router_bias_paths(params):
    params = _set(params, path, moe.update_bias(_get(params, path), router[name]["load"], cfg.bias_update_speed))
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


def _part(path) -> str:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  if keys[0] == "embed":
    return "embedding"
  if keys[0] == "head":
    return "head"
  for key, part in [("experts", "routed_experts"), ("shared", "shared_experts"), ("router", "router"),
                    ("attn", "attention")]:
    if key in keys:
      return part
  return "dense_mlp" if "ffn" in keys else "norms"


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
