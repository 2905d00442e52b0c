"""What a mesh costs before it exists: per-device bytes of parameters, gradients, optimizer state and
activations, the all-to-all traffic of each MoE layer and its time at a link bandwidth (the H800's
NVLink is 400 GB/s against 900 on an H100, the constraint DualPipe works around: V3 report §3.2.1), the
context axis's all-gather of what attention reads, and an ahead-of-time lowering of the train step on an
abstract mesh from ShapeDtypeStructs (no allocation)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax import sharding, train
from r1jax.batch import Batch
from r1jax.config import ComputeConfig, ModelConfig, RunConfig
from r1jax.nn import expert_ffn, expert_parallel, grouped_gemm


def shard_bytes(shape, dtype, spec: P, sizes: dict[str, int]) -> int:
  """Bytes of one device's shard (dims split over their mesh axes, rounded up as GSPMD pads)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  n = 1
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    n *= math.ceil(dim / math.prod(sizes.get(a, 1) for a in axes))
  return n * jnp.dtype(dtype).itemsize


def state_bytes(cfg: RunConfig, sizes: dict[str, int]) -> dict:
  """Per-device bytes of params, grads (param dtype) and optimizer state under sharding.RULES."""
  state = train.abstract_state(cfg, sharding.abstract_mesh(sizes))
  total = lambda tree: sum(shard_bytes(x.shape, x.dtype, x.sharding.spec, sizes)  # noqa: E731
                           for x in jax.tree.leaves(tree))
  params = total(state.params)
  return {"params": params, "grads": params, "optimizer": total(state.opt_state)}


def expert_tile_bytes(cfg: RunConfig, sizes: dict[str, int]) -> int:
  """Per-device bytes of the MoE stack's routed-expert weights quantised ahead, held through a step
  (FP8Config.quantize_experts_once, moe.with_expert_tiles): e4m3 in both majors and fp32 block scales, each
  split like its weight; 0 where the experts are not quantised that way."""
  fp8 = cfg.compute.fp8.use("routed_experts")
  if (fp8 is None or not fp8.quantize_experts_once or not cfg.model.n_moe_layers
      or expert_ffn.gemm_impl(cfg.compute) != "einsum"):
    return 0
  experts = train.abstract_state(cfg, sharding.abstract_mesh(sizes)).params["moe_layers"]["ffn"]["experts"]
  b = fp8.block
  total = 0
  for w in experts.values():
    *lead, K, N = w.shape
    total += 2 * shard_bytes(w.shape, jnp.float8_e4m3fn, w.sharding.spec, sizes)
    total += shard_bytes((*lead, K // b, N // b), jnp.float32, w.sharding.spec, sizes)
  return total


def attention_impl(compute: ComputeConfig, backend: str, context: int = 1, packed: bool = False) -> str:
  """The attention SFT runs on `backend` (nn/attention.py's choice, decided here without arrays): auto takes
  blockwise under context parallelism (the kernels' causal masks assume a shard's queries start at 0), else
  splash on TPU, cuDNN on GPU for unpacked rows (packed batches carry segment ids, which cuDNN is not given),
  else xla."""
  impl = compute.attention_impl
  if impl != "auto":
    return impl
  if context > 1:
    return "blockwise"
  return {"tpu": "splash", "gpu": "xla" if packed else "cudnn"}.get(backend, "xla")


def fused_attention(compute: ComputeConfig, backend: str, context: int = 1, packed: bool = False) -> bool:
  """Whether SFT attention keeps no [L, S] scores for the backward pass (every implementation but xla)."""
  return attention_impl(compute, backend, context, packed) != "xla"


def attention_block_bytes(cfg: ModelConfig, compute: ComputeConfig, sizes: dict[str, int], batch: int,
                          seq: int) -> int:
  """Blockwise attention's transient per device: four fp32 [H, L/N, attention_block] tensors of one layer's
  backward step (scores, probabilities, their gradient and the scores'), freed before the next block."""
  heads = cfg.n_heads / sizes["tensor"]
  return int(4 * _tokens_per_device(sizes, batch, seq) * heads * min(compute.attention_block, seq) * 4)


def activation_bytes(cfg: ModelConfig, compute: ComputeConfig, sizes: dict[str, int], batch: int, seq: int,
                     fused: bool = True) -> int:
  """Per-device estimate of what the backward pass keeps, itemised per token and layer. Fused attention keeps
  its output and log-sum-exp only, so nothing grows with L^2; the XLA path (fused=False) adds fp32 scores
  and probabilities, [H, L] per token. remat "dots" keeps the outputs of the dense
  projections (dots without batch dims) and each layer's input; "full" keeps layer inputs plus one layer
  being recomputed; "none" keeps every intermediate, the fp32 RMSNorm inputs and the expert buffers too.
  The head's logits live one chunk at a time (losses.head_logprobs)."""
  tokens = _tokens_per_device(sizes, batch, seq)
  n_ctx = _context(sizes)  # each device keeps the keys and values of n_ctx times its own tokens
  t, b, f32 = sizes["tensor"], jnp.dtype(compute.dtype).itemsize, 4
  D, H, E, K = cfg.dim, cfg.n_heads, cfg.n_routed_experts, cfg.n_activated_experts
  if cfg.attention == "gqa":
    proj = (H + 2 * cfg.n_kv_heads * n_ctx) * cfg.head_dim / t + D  # q, k, v, o
    attn_rest = (H * cfg.head_dim / t) * b + H / t * f32 + 2 * D * f32  # attention output, lse, norm input
  else:  # the gathered latent and the keys and values decompressed from it span the whole sequence
    proj = (cfg.q_lora_rank + H * cfg.qk_head_dim / t + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * n_ctx
            + H * (cfg.qk_nope_head_dim + cfg.v_head_dim) / t * n_ctx + D)
    # q and k concatenated per head, attention output, lse, fp32 norm inputs (block and latent norms)
    attn_rest = (H * (2 * cfg.qk_head_dim + cfg.v_head_dim) / t) * b + H / t * f32 + (2 * D + cfg.q_lora_rank
                                                                                      + cfg.kv_lora_rank) * f32
  if not fused:
    attn_rest += 2 * H / t * seq * f32
  shared = 3 * cfg.n_shared_experts * cfg.moe_inter_dim / t
  dense_dots, moe_dots = (proj + 3 * cfg.inter_dim / t) * b, (proj + shared) * b + E * f32  # + router scores
  if compute.fp8.enabled and compute.remat == "dots":  # a kept FP8 GEMM keeps its e4m3 input and scales (fp8/dot.py)
    q8 = 1 + f32 / compute.fp8.block
    if cfg.attention == "mla":  # x once for wq_a and wkv_a (twice without q_lora), the latents, o's input
      attn_in = (D + cfg.q_lora_rank if cfg.q_lora_rank else 2 * D) + cfg.kv_lora_rank + H * cfg.v_head_dim / t
    else:  # x for each of q, k, v, and o's input
      attn_in = 3 * D + H * cfg.head_dim / t
    attn_in = attn_in if compute.fp8.use("attention") else 0
    mlp_in = lambda use, inter: (D + inter / t) if use else 0  # noqa: E731  (gate/up share one quantised x)
    dense_dots += q8 * (attn_in + mlp_in(compute.fp8.use("dense_mlp"), cfg.inter_dim))
    moe_dots += q8 * (attn_in + cfg.n_shared_experts * mlp_in(compute.fp8.use("shared_experts"), cfg.moe_inter_dim))
  C = expert_parallel.capacity(max(1, int(tokens)), cfg, compute.capacity_factor)
  rows = C * E / max(tokens, 1)  # padded expert rows per token
  if expert_ffn.gemm_impl(compute) == "grouped" and sizes["expert"] == 1:  # sorted rows, tile-aligned groups
    n = max(1, int(tokens)) * K
    rows = (n + E * (grouped_gemm.row_tile(n, E) - 1)) / max(tokens, 1)
  # dispatched rows, gate/up/silu/product, expert outputs; gathered outputs per slot in bf16 and fp32
  experts = rows * (2 * D + 4 * cfg.moe_inter_dim / t) * b + K * D * (b + f32)
  dense = dense_dots + attn_rest + 2 * cfg.inter_dim / t * b
  moe = moe_dots + attn_rest + experts + cfg.n_shared_experts * 2 * cfg.moe_inter_dim / t * b
  n_moe = cfg.n_moe_layers + cfg.n_mtp
  layer_inputs = (cfg.n_layers + cfg.n_mtp) * D * b
  chunk = seq if compute.head_chunk <= 0 else min(compute.head_chunk, seq)
  logits = 2 * cfg.vocab_size / t * f32 * chunk / seq  # one chunk's logits and softmax at a time
  if compute.remat == "none":
    per_token = cfg.n_dense_layers * dense + n_moe * moe + layer_inputs
  elif compute.remat == "dots":
    per_token = cfg.n_dense_layers * dense_dots + n_moe * moe_dots + layer_inputs + max(dense, moe)
  else:
    per_token = layer_inputs + max(dense, moe)
  return int(tokens * (per_token + logits))


def all_to_all(cfg: ModelConfig, compute: ComputeConfig, sizes: dict[str, int], batch: int, seq: int,
               link_GBps: float) -> dict:
  """Bytes one device sends to other devices per MoE layer per step, and the time at `link_GBps`.

  A step has a dispatch and a combine forward and their transposes backward (and the forward again
  under remat); each moves the [E, C, D] buffer, of which (n_ep - 1) / n_ep leaves the device.
  """
  n_ep = sizes["expert"]
  tokens = int(_tokens_per_device(sizes, batch, seq))
  C = expert_parallel.capacity(tokens, cfg, compute.capacity_factor)
  b = jnp.dtype(compute.dtype).itemsize
  leaves = (n_ep - 1) / n_ep
  n_ops = 4 if compute.remat == "none" else 6
  per_op = cfg.n_routed_experts * C * cfg.dim * b * leaves
  routed = tokens * cfg.n_activated_experts * cfg.dim * b * leaves  # what a ragged (unpadded) exchange moves
  per_layer = n_ops * per_op
  n_layers = cfg.n_moe_layers + cfg.n_mtp
  seconds = per_layer / (link_GBps * 1e9)
  gemm_flops = 3 * 2 * 3 * cfg.dim * cfg.moe_inter_dim / sizes["tensor"] * cfg.n_routed_experts * C
  return {"tokens_per_device": tokens, "capacity": C, "exchanges_per_layer": n_ops,
          "bytes_per_exchange": int(per_op), "bytes_per_layer": int(per_layer),
          "unpadded_bytes_per_layer": int(n_ops * routed), "moe_layers": n_layers,
          "bytes_per_step": int(per_layer * n_layers), "link_GBps": link_GBps,
          "ms_per_layer": 1e3 * seconds, "ms_per_step": 1e3 * seconds * n_layers,
          "expert_gemm_flops_per_layer": int(gemm_flops)}


def _context(sizes: dict[str, int]) -> int:
  return math.prod(sizes.get(a, 1) for a in sharding.mesh_axes("seq"))


def _tokens_per_device(sizes: dict[str, int], batch: int, seq: int) -> float:
  """Tokens of one device: rows split over the batch axes, each row over the context axis."""
  return batch * seq / math.prod(sizes[a] for a in sharding.mesh_axes("batch")) / _context(sizes)


def context_exchange(cfg: ModelConfig, compute: ComputeConfig, sizes: dict[str, int], batch: int, seq: int,
                     link_GBps: float) -> dict:
  """Bytes one device receives per attention layer per step for context parallelism, and the time at
  `link_GBps`. Each layer all-gathers what attention reads over the context axis (MLA: the latent and the
  shared rope key, kv_lora_rank + qk_rope_head_dim values per token; GQA: the keys and values), the backward
  pass reduce-scatters its gradient (the same bytes), and remat's recomputed forward gathers again."""
  n_ctx = _context(sizes)
  rows = batch / math.prod(sizes[a] for a in sharding.mesh_axes("batch"))
  b = jnp.dtype(compute.dtype).itemsize
  if cfg.attention == "mla":
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  else:
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim / sizes["tensor"]
  n_ops = 2 if compute.remat == "none" else 3
  per_op = rows * seq * per_token * b * (n_ctx - 1) / n_ctx
  n_layers = cfg.n_layers + cfg.n_mtp
  seconds = n_ops * per_op / (link_GBps * 1e9)
  return {"context": n_ctx, "values_per_token": per_token, "exchanges_per_layer": n_ops,
          "bytes_per_exchange": int(per_op), "bytes_per_layer": int(n_ops * per_op), "attention_layers": n_layers,
          "bytes_per_step": int(n_ops * per_op * n_layers), "link_GBps": link_GBps,
          "ms_per_layer": 1e3 * seconds, "ms_per_step": 1e3 * seconds * n_layers}


def report(cfg: RunConfig, sizes: dict[str, int], batch: int, seq: int, link_GBps: float) -> dict:
  """The `r1jax info --mesh` numbers for one device of the mesh."""
  mesh = sharding.abstract_mesh(sizes)
  sharding.validate_mesh(cfg.model, cfg.compute, mesh, batch, seq)
  mem = state_bytes(cfg, sizes)
  if tiles := expert_tile_bytes(cfg, sizes):
    mem["fp8_expert_tiles"] = tiles
  impl = attention_impl(cfg.compute, jax.default_backend(), _context(sizes), cfg.data.pack)
  fused = impl != "xla"
  mem["activations_estimate"] = activation_bytes(cfg.model, cfg.compute, sizes, batch, seq, fused)
  if impl == "blockwise":
    mem["attention_blocks"] = attention_block_bytes(cfg.model, cfg.compute, sizes, batch, seq)
  mem["total"] = sum(mem.values())
  out = {"mesh": sizes, "devices": math.prod(sizes.values()), "batch": batch, "seq_len": seq,
         "bytes_per_device": mem, "attention_impl": impl, "fused_attention": fused}
  if cfg.model.n_moe_layers or cfg.model.n_mtp:
    out["all_to_all"] = all_to_all(cfg.model, cfg.compute, sizes, batch, seq, link_GBps)
  if _context(sizes) > 1:
    out["context_exchange"] = context_exchange(cfg.model, cfg.compute, sizes, batch, seq, link_GBps)
  return out


def lower(cfg: RunConfig, sizes: dict[str, int], batch: int, seq: int) -> dict:
  """Lower the jitted train step on an abstract mesh from ShapeDtypeStructs (nothing is allocated);
  compile it and read XLA's memory analysis when this backend has enough devices for the mesh."""
  mesh = sharding.abstract_mesh(sizes)
  sharding.validate_mesh(cfg.model, cfg.compute, mesh, batch, seq)
  state = train.abstract_state(cfg, mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  batch_sds = Batch(tokens, tokens, tokens)
  step = train.jit_sft_step(state, batch_sds, mesh)  # the step `r1jax sft` runs, as it is jitted there
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = step.trace(state, batch_sds).lower(lowering_platforms=(jax.default_backend(),))
  out = {"lowered": True, "platform": jax.default_backend(), "hlo_chars": len(lowered.as_text())}
  n = math.prod(sizes.values())
  if len(jax.devices()) < n:
    out["memory_analysis"] = None
    out["note"] = (f"compiling needs {n} {jax.default_backend()} devices, this process has {len(jax.devices())}"
                   f" (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return out
  compiled = lowered.compile(device_assignment=tuple(jax.devices()[:n]))
  stats = compiled.memory_analysis()
  fields = ["argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes"]
  out["memory_analysis"] = None if stats is None else {f: int(getattr(stats, f)) for f in fields}
  return out
