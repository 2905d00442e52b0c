"""TrainState, the optimizer and the pure SFT step; jit, shardings and donation are declared once here."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax import losses, model, sharding
from r1jax.batch import Batch
from r1jax.config import ComputeConfig, ModelConfig, OptimConfig, RunConfig
from r1jax.nn import fp8, layers


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs: a restored state continues bit-exactly."""

  step: jax.Array  # optimizer steps taken (skipped ones included: their data was consumed)
  params: dict
  opt_state: Any
  rng: jax.Array  # uint32 key data (checkpointable); wrap with jax.random.wrap_key_data
  bad_steps: jax.Array  # non-finite steps in a row (the update was not applied)
  skipped_steps: jax.Array  # non-finite steps in all
  cfg: ModelConfig = flax.struct.field(pytree_node=False)  # the architecture
  compute: ComputeConfig = flax.struct.field(pytree_node=False)  # how the step computes it
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  grad_accum: int = flax.struct.field(pytree_node=False, default=1)  # micro-batches per step


def schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to lr * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                            max(cfg.decay_steps, cfg.warmup_steps + 1), cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, model_cfg: ModelConfig) -> optax.GradientTransformation:
  """AdamW with warmup-cosine and global-norm clipping; weight decay on matrices only (model.decay_mask,
  from logical names, since stacked layers give norm gains a second axis); router biases frozen."""
  decay = model.decay_mask(model_cfg)
  adamw = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay))
  labels = jax.tree.map(lambda t: "train" if t else "frozen", model.trainable_mask(decay))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings, default):
  """Shardings (or specs) for tx.init(params): each param-shaped moment follows its param, the rest
  (step counts) gets `default`; router-bias slots masked out by multi_transform stay empty."""
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, jax.eval_shape(tx.init, params),
                               param_shardings, transform_non_params=lambda _: default, is_leaf=masked)


def init_state(cfg: RunConfig, key, mesh) -> TrainState:
  """Params and optimizer state created directly in their shardings (optimizer state follows params)."""
  if mesh is not None:
    sharding.validate_mesh(cfg.model, cfg.compute, mesh)  # one-line ConfigError before anything compiles
  params = model.init(cfg.model, cfg.compute, key, mesh)
  tx = make_optimizer(cfg.optim, cfg.model)
  # GSPMD does not carry the params' shardings to fresh zeros: without out_shardings Adam's moments
  # would be replicated on every device.
  opt_shardings = None if mesh is None else optimizer_shardings(
      tx, params, jax.tree.map(lambda x: x.sharding, params), sharding.named(mesh, ()))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
  rng = jax.random.key_data(jax.random.fold_in(key, 1))
  return TrainState(zero(), params, opt_state, rng, zero(), zero(), cfg.model, cfg.compute, tx, cfg.train.grad_accum)



def abstract_state(cfg: RunConfig, mesh):
  """The TrainState as ShapeDtypeStructs carrying their NamedShardings on `mesh` (abstract or concrete)."""
  boxed = model.abstract(cfg.model, cfg.compute)
  specs = jax.tree.map(lambda p: sharding.spec(*p.names), boxed, is_leaf=layers.is_param)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))  # noqa: E731
  params = jax.tree.map(lambda p, s: sds(p.value, s), boxed, specs, is_leaf=layers.is_param)
  tx = make_optimizer(cfg.optim, cfg.model)
  opt_state = jax.eval_shape(tx.init, params)
  opt_state = jax.tree.map(sds, opt_state, optimizer_shardings(tx, params, specs, P()))
  step = sds(jax.ShapeDtypeStruct((), jnp.int32), P())
  rng = sds(jax.ShapeDtypeStruct((2,), jnp.uint32), P())
  return TrainState(step, params, opt_state, rng, step, step, cfg.model, cfg.compute, tx, cfg.train.grad_accum)

def loss_totals(batch: Batch, cfg: ModelConfig) -> dict:
  """Units each loss averages over, for the whole batch: passed to loss_fn of each micro-batch so that
  accumulated micro-batch gradients equal the large batch's."""
  tokens = batch.tokens_BxL
  seg = jnp.zeros_like(tokens) if batch.segment_ids_BxL is None else batch.segment_ids_BxL
  token_mask = jnp.ones_like(tokens) if batch.token_mask_BxL is None else batch.token_mask_BxL
  totals = {"tokens": batch.loss_mask_BxL.astype(jnp.float32).sum(),
            "sequences": losses.count_sequences(token_mask, seg)}
  if cfg.n_mtp:
    totals["mtp_tokens"] = jnp.stack([m.sum() for m in losses.mtp_masks(batch.loss_mask_BxL, seg, cfg.n_mtp)])
  return totals


def loss_fn(params: dict, batch: Batch, cfg: ModelConfig, compute: ComputeConfig, totals: dict | None = None):
  """Next-token CE + MTP loss + sequence-wise balance loss; returns (loss, (metrics, router stats)).

  With `totals` (loss_totals of a larger batch) each term is this batch's share of that batch's mean.
  """
  segment_ids = batch.segment_ids_BxL
  out = model.apply(params, batch.tokens_BxL, cfg, compute, positions_BxL=batch.positions_BxL,
                    segment_ids_BxL=segment_ids, token_mask_BxL=batch.token_mask_BxL, logits=False)
  totals = totals or {}
  head = model.head_fn(params, cfg)
  logp_BxL, _ = losses.head_logprobs(out.hidden_BxLxD, head, batch.targets_BxL, compute.head_chunk)
  ce, n_tokens = losses.masked_nll(logp_BxL, batch.loss_mask_BxL, totals.get("tokens"))
  loss, metrics = ce, {"ce": ce, "tokens": n_tokens}
  if cfg.n_mtp:
    seg = jnp.zeros_like(batch.tokens_BxL) if segment_ids is None else segment_ids
    metrics["mtp_loss"] = losses.mtp_loss(out.mtp_hidden_PxBxLxD, head, batch.targets_BxL, batch.loss_mask_BxL, seg,
                                          cfg.n_mtp, compute.mtp_loss_weight, compute.head_chunk,
                                          totals.get("mtp_tokens"))
    loss = loss + metrics["mtp_loss"]
  if out.router:
    aux = losses.router_aux_loss(out.router)
    if "sequences" in totals:
      seg = jnp.zeros_like(batch.tokens_BxL) if segment_ids is None else segment_ids
      token_mask = jnp.ones_like(batch.tokens_BxL) if batch.token_mask_BxL is None else batch.token_mask_BxL
      aux = aux * losses.count_sequences(token_mask, seg) / jnp.maximum(totals["sequences"], 1.0)
    metrics["aux_loss"] = aux
    loss = loss + aux
  metrics["loss"] = loss
  return loss, (metrics, out.router)


def accumulated_grads(params: dict, batch: Batch, cfg: ModelConfig, compute: ComputeConfig, n_micro: int):
  """Gradients of loss_fn over `n_micro` micro-batches (rows split in order), run one after another with
  lax.scan so activations are held for one micro-batch only. Equals one large batch up to fp32 rounding.

  Returns (metrics, router stats with loads and drops summed), grads.
  """
  totals = loss_totals(batch, cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n_micro == 1:
    (_, (metrics, router)), grads = grad_fn(params, batch, cfg, compute, totals)
    return (metrics, router), grads
  micro = jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

  def body(acc, mb):
    mb = jax.tree.map(lambda x: sharding.constrain(x, "batch", *([None] * (x.ndim - 1))), mb)
    (_, (metrics, router)), grads = grad_fn(params, mb, cfg, compute, totals)
    stats = {k: {"load": s["load"], "dropped_pairs": s["dropped_pairs"], "aux_loss": s["aux_loss"]}
             for k, s in router.items()}
    out = (metrics, stats, grads)
    return jax.tree.map(jnp.add, acc, out) if acc is not None else out, None

  first = jax.tree.map(lambda x: x[0], micro)
  acc, _ = body(None, first)
  acc, _ = jax.lax.scan(body, acc, jax.tree.map(lambda x: x[1:], micro))
  metrics, router, grads = acc
  return (metrics, router), grads


def load_metrics(router: dict) -> dict:
  """Routing-collapse watch: max/mean tokens per expert (1.0 is perfectly balanced), and the (token, slot)
  pairs dropped by expert capacity."""
  load_NxE = jnp.concatenate([s["load"] for s in router.values()])
  return {"expert_load_max_over_mean": (load_NxE.max(-1) / jnp.maximum(load_NxE.mean(-1), 1e-9)).mean(),
          "dropped_pairs": sum(s["dropped_pairs"].sum() for s in router.values())}


def apply_gradients(state: TrainState, grads: dict, router: dict, metrics: dict) -> tuple[TrainState, dict]:
  """The optimizer update, then the aux-loss-free router-bias update from the observed load. A non-finite
  loss or gradient norm leaves params, optimizer state and biases untouched and is counted (bad_steps in a
  row, skipped_steps in all). The step counter is the caller's."""
  fp8.weights.refuse_training(state.params)  # every step kind (SFT, GRPO) ends here: refused while tracing
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if router:
    params = model.update_router_bias(params, router, state.compute.bias_update_speed)
    metrics.update(load_metrics(router))
  metrics["grad_norm"] = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  bad = jnp.where(finite, 0, state.bad_steps + 1)
  skipped = state.skipped_steps + (~finite).astype(jnp.int32)
  metrics.update(skipped_steps=skipped, bad_steps=bad)
  return state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                       bad_steps=bad, skipped_steps=skipped), metrics


def sft_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
  """One supervised step: gradients (accumulated over micro-batches), then apply_gradients."""
  (metrics, router), grads = accumulated_grads(state.params, batch, state.cfg, state.compute, state.grad_accum)
  state, metrics = apply_gradients(state, grads, router, metrics)
  return state.replace(step=state.step + 1), metrics


def state_shardings(state: TrainState):
  return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(batch: Batch, mesh) -> Batch:
  """Every batch array is split over "batch" along its first axis and replicated along the others."""
  return jax.tree.map(lambda x: sharding.named(mesh, ("batch",) + (None,) * (x.ndim - 1)), batch)


def jit_step(step_fn, state: TrainState, batch: Batch, mesh):
  """A pure (state, batch) -> (state, metrics) step compiled once: the state keeps its shardings and is
  donated; every batch array is split over "batch" (rows) and replicated along its other axes."""
  shardings = state_shardings(state)
  return jax.jit(step_fn, in_shardings=(shardings, batch_shardings(batch, mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def jit_sft_step(state: TrainState, batch: Batch, mesh):
  return jit_step(sft_step, state, batch, mesh)
