"""`r1jax bench experts`: the routed-expert layer alone (dispatch, SwiGLU, combine) at the bench model's shapes,
forward and forward + backward, for each expert-GEMM form: the capacity-padded einsum (what drops, and what
capacity 0 costs), the dropless grouped GEMM with the Pallas Triton kernels (a few tile choices), XLA's ragged_dot,
and tokamax's ragged_dot where it imports. Each arm's output and gradients are compared with the same layer in
float32 (the XLA grouped form at highest precision): max |error| / max |reference| per tensor."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.bench.timing import median_seconds
from r1jax.config import RunConfig
from r1jax.nn import expert_ffn, expert_parallel, grouped_gemm, grouped_gemm_triton

TILES = {"default": grouped_gemm_triton.Tiles(),
         "w8": grouped_gemm_triton.Tiles(num_warps=8),
         "bn256_w8": grouped_gemm_triton.Tiles(bn=256, num_warps=8),
         "bk32_s4": grouped_gemm_triton.Tiles(bk=32, num_stages=4),
         "bn64_s4": grouped_gemm_triton.Tiles(bn=64, num_stages=4),
         "s4_w8": grouped_gemm_triton.Tiles(num_stages=4, num_warps=8)}


def _tokamax_swiglu():
  """The SwiGLU through tokamax.ragged_dot (Mosaic GPU) on the sorted layout, or the import error."""
  try:
    import tokamax
  except Exception as e:  # noqa: BLE001 - reported in the result, not raised
    return None, f"{type(e).__name__}: {e}"

  def gmm(x, w, lay):
    out = tokamax.ragged_dot(x, w.astype(x.dtype), lay.tiles_E * lay.bm, implementation="mosaic",
                             preferred_element_type=x.dtype)
    written = jnp.arange(out.shape[0])[:, None] < lay.used * lay.bm  # it leaves the rows past the groups unwritten
    return jnp.where(written, out, 0)

  def swiglu(experts, x_RxD, lay):
    gate, up = gmm(x_RxD, experts["w_gate"], lay), gmm(x_RxD, experts["w_up"], lay)
    return gmm(jax.nn.silu(gate) * up, experts["w_down"], lay)

  return swiglu, getattr(tokamax, "__version__", "?")


def _layer(cfg: RunConfig, ffn: expert_ffn.ExpertFFN, capacity_factor: float):
  def f(experts, x_TxD, weights_TxK, experts_TxK):
    y, dropped = expert_parallel.dispatch_combine(experts, x_TxD, weights_TxK, experts_TxK, None, cfg.model,
                                                  capacity_factor, (), ffn)
    return y, dropped
  return f


def _sorted_ffn(swiglu) -> expert_ffn.ExpertFFN:
  return expert_ffn.ExpertFFN(lambda e, x, _, valid: expert_ffn.compact_sorted(functools.partial(swiglu, e), x, valid),
                              sorted=swiglu)


def _rel(a, ref) -> float:
  a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def bench_experts(cfg: RunConfig, tokens: int = 16384, repeats: int = 10, arms: list[str] | None = None) -> dict:
  m = cfg.model
  E, K, D, F = m.n_routed_experts, m.n_activated_experts, m.dim, m.moe_inter_dim
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (tokens, D), jnp.bfloat16)
  experts = {"w_gate": (jax.random.normal(keys[1], (E, D, F)) / np.sqrt(D)).astype(jnp.bfloat16),
             "w_up": (jax.random.normal(keys[2], (E, D, F)) / np.sqrt(D)).astype(jnp.bfloat16),
             "w_down": (jax.random.normal(keys[3], (E, F, D)) / np.sqrt(F)).astype(jnp.bfloat16)}
  experts_TxK = jnp.argsort(jax.random.uniform(keys[4], (tokens, E)), axis=-1)[:, :K].astype(jnp.int32)
  weights_TxK = jax.nn.softmax(jax.random.normal(keys[5], (tokens, K)), -1)
  cot = jax.random.normal(keys[0], (tokens, D), jnp.bfloat16)
  useful = 2 * tokens * K * D * F * 3  # the forward's three GEMMs over the real rows

  def xla_swiglu(e, x_RxD, lay):
    return grouped_gemm.swiglu(e, x_RxD, lay, "xla")

  forms = {"einsum_cf1.25": (expert_ffn.ExpertFFN(lambda e, x, _, v: expert_ffn.padded(e, x)), 1.25),
           "einsum_cf0": (expert_ffn.ExpertFFN(lambda e, x, _, v: expert_ffn.padded(e, x)), 0.0),
           "grouped_xla": (_sorted_ffn(xla_swiglu), 0.0)}
  for name, tiles in TILES.items():
    forms[f"grouped_triton_{name}"] = (_sorted_ffn(
        lambda e, x_RxD, lay, t=tiles: grouped_gemm.swiglu(e, x_RxD, lay, "triton", tiles=t)), 0.0)
  tok_swiglu, tok_version = _tokamax_swiglu()
  if tok_swiglu is not None:
    forms["grouped_tokamax"] = (_sorted_ffn(tok_swiglu), 0.0)

  # float32 reference: the XLA grouped form at highest precision on the same (bf16-valued) inputs
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, t)  # noqa: E731
  ref_layer = _layer(cfg, _sorted_ffn(xla_swiglu), 0.0)
  with jax.default_matmul_precision("highest"):
    ref_y = jax.jit(ref_layer)(f32(experts), f32(x), weights_TxK, experts_TxK)[0]
    ref_g = jax.jit(jax.grad(lambda e, x: jnp.sum(ref_layer(e, x, weights_TxK, experts_TxK)[0] * f32(cot)),
                             argnums=(0, 1)))(f32(experts), f32(x))

  results = {}
  for name, (ffn, cf) in forms.items():
    if arms and name not in arms:
      continue
    layer = _layer(cfg, ffn, cf)
    fwd = jax.jit(layer)
    grad = jax.jit(jax.grad(lambda e, x: jnp.sum(layer(e, x, weights_TxK, experts_TxK)[0].astype(jnp.float32) *
                                                  cot.astype(jnp.float32)), argnums=(0, 1)))
    try:
      y, dropped = fwd(experts, x, weights_TxK, experts_TxK)
      g = grad(experts, x)
      slow = name in ("grouped_xla", "einsum_cf0")
      t_fwd = median_seconds(fwd, experts, x, weights_TxK, experts_TxK, repeats=3 if slow else repeats,
                             calls=1 if slow else 5)
      t_bwd = median_seconds(grad, experts, x, repeats=3 if slow else repeats, calls=1 if slow else 5)
    except Exception as e:  # noqa: BLE001 - one arm's failure is its result
      results[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
      continue
    results[name] = {
        "capacity_factor": cf, "dropped_pairs": int(dropped),
        "fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_bwd * 1e3,
        "fwd_useful_tflops": useful / t_fwd / 1e12, "fwd_bwd_useful_tflops": 3 * useful / t_bwd / 1e12,
        "error_y": _rel(y, ref_y), "error_dx": _rel(g[1], ref_g[1]),
        "error_dw": {k: _rel(g[0][k], ref_g[0][k]) for k in experts},
    }
  return {"bench": "experts", "device_kind": jax.devices()[0].device_kind, "tokens": tokens, "experts": E, "top_k": K,
          "dim": D, "expert_dim": F, "dtype": "bfloat16", "useful_fwd_gflop": useful / 1e9,
          "tokamax": tok_version, "tiles": {k: t._asdict() for k, t in TILES.items()}, "arms": results}
