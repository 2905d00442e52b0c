"""TrainState, the optimizer and the pure SFT step; jit, shardings and donation are declared once here."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from r1jax import losses, model, sharding
from r1jax.config import ModelConfig, OptimConfig, RunConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  cfg: ModelConfig = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


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
    sharding.validate_mesh(cfg.model, mesh)  # one-line ConfigError before anything compiles
  params = model.init(cfg.model, key, mesh)
  tx = make_optimizer(cfg.optim, cfg.model)
  # GSPMD does not carry the params' shardings to fresh zeros: without out_shardings Adam's moments
  # would be replicated on every device.
  opt_shardings = None if mesh is None else optimizer_shardings(
      tx, params, jax.tree.map(lambda x: x.sharding, params), sharding.named(mesh, ()))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return TrainState(jnp.zeros((), jnp.int32), params, opt_state, cfg.model, tx)


def loss_fn(params: dict, batch: dict, cfg: ModelConfig):
  """Next-token CE + MTP loss + sequence-wise balance loss; returns (loss, (metrics, router stats))."""
  segment_ids = batch.get("segment_ids")
  out = model.apply(params, batch["tokens"], cfg, positions_BxL=batch.get("positions"),
                    segment_ids_BxL=segment_ids, token_mask_BxL=batch.get("token_mask"))
  ce, n_tokens = losses.cross_entropy(out.logits_BxLxV, batch["targets"], batch["loss_mask"])
  loss, metrics = ce, {"ce": ce, "tokens": n_tokens}
  if cfg.n_mtp:
    seg = jnp.zeros_like(batch["tokens"]) if segment_ids is None else segment_ids
    metrics["mtp_loss"] = losses.mtp_loss(out.mtp_logits_NxBxLxV, batch["targets"], batch["loss_mask"], seg, cfg)
    loss = loss + metrics["mtp_loss"]
  if out.router:
    metrics["aux_loss"] = losses.router_aux_loss(out.router)
    loss = loss + metrics["aux_loss"]
  metrics["loss"] = loss
  return loss, (metrics, out.router)


def load_metrics(router: dict) -> dict:
  """Routing-collapse watch: max/mean tokens per expert (1.0 is perfectly balanced), and the (token, slot)
  pairs dropped by expert capacity."""
  load_NxE = jnp.concatenate([s["load"] for s in router.values()])
  return {"expert_load_max_over_mean": (load_NxE.max(-1) / jnp.maximum(load_NxE.mean(-1), 1e-9)).mean(),
          "dropped_pairs": sum(s["dropped_pairs"].sum() for s in router.values())}


def sft_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One supervised step: gradients, optimizer update, then the aux-loss-free router-bias update."""
  (_, (metrics, router)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.cfg)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if router:
    params = model.update_router_bias(params, router, state.cfg)
    metrics.update(load_metrics(router))
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def state_shardings(state: TrainState):
  return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(batch: dict, mesh) -> dict:
  return {k: sharding.named(mesh, ("batch", "seq")) for k in batch}


def jit_sft_step(state: TrainState, batch: dict, mesh):
  """sft_step compiled once: state keeps its shardings and is donated; the batch is split over "batch"."""
  shardings = state_shardings(state)
  return jax.jit(sft_step, in_shardings=(shardings, batch_shardings(batch, mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)
