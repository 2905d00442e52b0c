"""Expert parallelism on 8 simulated devices: every mesh layout equals the 1-device dropless reference,
and capacity drops equal an independent numpy count."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from r1jax import model, sharding, train
from r1jax.batch import Batch
from r1jax.config import MeshConfig
from r1jax.nn import expert_parallel as ep
from r1jax.nn import layers, moe

MESHES = {
    "ep8": MeshConfig(data=1, expert=8),
    "dp2_ep4": MeshConfig(data=2, expert=4),
    "fsdp2_ep2_tp2": MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
}


def _close(got, want, tol=2e-5):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol), got, want)


# ---------------------------------------------------------------------------------------------- plan


def test_capacity_rule(tiny):
  cfg = tiny.model  # E=16, K=4
  assert ep.capacity(64, cfg, 0.0) == 64  # dropless: every token fits
  assert ep.capacity(64, cfg, 1.25) == math.ceil(1.25 * 64 * 4 / 16)
  assert ep.capacity(64, cfg, 100.0) == 64  # a token picks an expert once


def test_plan_is_first_come_first_served_in_token_slot_order():
  experts_TxK = np.array([[0, 1], [1, 2], [1, 0], [3, 1]])
  E, C, T = 4, 2, 4
  pl = jax.device_get(ep.plan(jnp.asarray(experts_TxK), n_experts=E, C=C))
  used, slot_TK, token_EC = np.zeros(E, int), [], np.full(E * C, T)
  for t, k in np.ndindex(*experts_TxK.shape):  # the rule written out: pairs in t*K+k order, C rows each
    e = experts_TxK[t, k]
    slot_TK.append(e * C + used[e] if used[e] < C else E * C)
    if used[e] < C:
      token_EC[e * C + used[e]] = t
    used[e] += 1
  np.testing.assert_array_equal(pl.slot_TK, slot_TK)
  np.testing.assert_array_equal(pl.token_EC, token_EC)
  np.testing.assert_array_equal(pl.kept_E, np.minimum(used, C))
  assert pl.dropped_pairs == 2  # expert 1 is picked by tokens 0, 1, 2, 3: the last two do not fit


# ----------------------------------------------------------------------------------------- MoE layer


def _moe_loss_of(apply_fn):
  def loss(p, x, cfg, compute):
    y, stats = apply_fn(p, x, cfg, compute)
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"], (y, stats)

  return loss


_moe_loss = _moe_loss_of(moe.apply)


def _moe_grad(p, x, cfg, compute):
  return jax.jit(jax.value_and_grad(_moe_loss, argnums=(0, 1), has_aux=True), static_argnums=(2, 3))(p, x, cfg, compute)


@pytest.fixture(scope="module")
def moe_case(tiny):
  boxed = moe.init(jax.random.key(0), tiny.model, tiny.compute)
  x = jax.random.normal(jax.random.key(1), (8, 16, tiny.model.dim))
  ref = jax.jit(jax.value_and_grad(_moe_loss_of(moe.dropless_reference), argnums=(0, 1), has_aux=True),
                static_argnums=(2, 3))(layers.unbox(boxed), x, tiny.model, tiny.compute)
  return boxed, x, ref


@pytest.mark.parametrize("mesh_name,gemm", [("ep8", "einsum"), ("dp2_ep4", "einsum"), ("fsdp2_ep2_tp2", "einsum"),
                                            ("fsdp2_ep2_tp2", "ragged_dot")])
def test_moe_layer_matches_reference(tiny, moe_case, mesh_name, gemm):
  boxed, x, ((_, (y_ref, stats_ref)), grads_ref) = moe_case
  compute = dataclasses.replace(tiny.compute, expert_gemm=gemm)
  mesh = sharding.make_mesh(MESHES[mesh_name])
  with jax.set_mesh(mesh):
    p = jax.device_put(layers.unbox(boxed), layers.shardings(boxed, mesh))
    (_, (y, stats)), grads = _moe_grad(p, x, tiny.model, compute)
  assert p["experts"]["w_gate"].sharding.spec == P("expert", ("fsdp", "context"), "tensor")
  assert p["experts"]["w_down"].sharding.spec == P("expert", "tensor", ("fsdp", "context"))
  _close(y, y_ref)
  np.testing.assert_array_equal(stats["load"], stats_ref["load"])
  assert stats["dropped_pairs"] == 0
  _close(stats["aux_loss"], stats_ref["aux_loss"], 1e-6)
  _close(grads, grads_ref, 1e-4)


def numpy_kept(experts_SxP, C: int, E: int):
  """Per shard, (token, slot) pairs claim their expert's C rows in token-slot order; True where one fits."""
  keep = np.zeros_like(experts_SxP, bool)
  for s in range(experts_SxP.shape[0]):
    used = np.zeros(E, int)
    for i, e in enumerate(experts_SxP[s]):
      keep[s, i] = used[e] < C
      used[e] += 1
  return keep


@pytest.mark.parametrize("capacity_factor", [0.5, 16.0])
def test_dropped_pairs_match_numpy_count(tiny, moe_case, capacity_factor):
  boxed, x, ((_, (y_dropless, _)), _) = moe_case
  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, capacity_factor=capacity_factor)
  mesh = sharding.make_mesh(MESHES["dp2_ep4"])
  p = layers.unbox(boxed)
  B, L, D = x.shape
  routing = jax.jit(moe.route, static_argnums=2)(p["router"], x.reshape(B * L, D), cfg)
  # numpy: the batch is split into 8 contiguous shards of T tokens; in each, (token, slot) pairs claim
  # their expert's C rows in token-slot order.
  shards, K = 8, cfg.n_activated_experts
  T = B * L // shards
  C = min(T, math.ceil(capacity_factor * T * K / cfg.n_routed_experts))
  keep = numpy_kept(np.asarray(routing.experts_TxK).reshape(shards, T * K), C, cfg.n_routed_experts)
  with jax.set_mesh(mesh):
    y, stats = jax.jit(moe.apply, static_argnums=(2, 3))(jax.device_put(p, layers.shardings(boxed, mesh)), x, cfg,
                                                         compute)
  assert int(stats["dropped_pairs"]) == (~keep).sum()
  # Output: the dense reference with the dropped pairs' gates zeroed.
  kept = routing._replace(weights_TxK=routing.weights_TxK * keep.reshape(B * L, K))
  x_TxD = x.reshape(B * L, D)
  y_ref = moe.routed_experts(p["experts"], x_TxD, kept, cfg) + layers.mlp(p["shared"], x_TxD)
  _close(y, y_ref.reshape(B, L, D))
  if capacity_factor == 16.0:
    assert keep.all()
    _close(y, y_dropless)
  else:
    assert (~keep).sum() > 0


def _packed_tokens(B, L, seed=0):
  """Rows of 1-3 packed segments with padding after some and in one row's middle; the last row is all padding."""
  rng = np.random.default_rng(seed)
  seg, mask = np.zeros((B, L), np.int32), np.ones((B, L), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, L), rng.integers(0, 3), replace=False))
    seg[b] = np.searchsorted(cuts, np.arange(L), side="right") * 7  # ids 0, 7, 14: unordered ids work too
    mask[b, L - rng.integers(0, L // 2):] = 0
  mask[1, 3:5], mask[-1] = 0, 0
  return moe.Tokens(jnp.asarray(mask), jnp.asarray(seg))


def test_padding_and_packing_on_a_mesh_match_the_reference(tiny, moe_case):
  """Padding takes no expert rows and no statistics; the balance loss is per packed segment."""
  boxed, x, _ = moe_case
  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, aux_loss_alpha=0.01)
  tokens = _packed_tokens(*x.shape[:2])
  p = layers.unbox(boxed)
  y_ref, stats_ref = jax.jit(moe.dropless_reference, static_argnums=(2, 3))(p, x, cfg, compute, tokens)
  mesh = sharding.make_mesh(MESHES["dp2_ep4"])
  with jax.set_mesh(mesh):
    y, stats = jax.jit(moe.apply, static_argnums=(2, 3))(jax.device_put(p, layers.shardings(boxed, mesh)), x, cfg,
                                                         compute, tokens)
  real = np.asarray(tokens.mask_BxL, bool)
  _close(np.asarray(y)[real], np.asarray(y_ref)[real])
  np.testing.assert_array_equal(stats["load"], stats_ref["load"])
  assert stats["load"].sum() == real.sum() * cfg.n_activated_experts
  _close(stats["aux_loss"], stats_ref["aux_loss"], 1e-6)
  shared_only = layers.mlp(p["shared"], x)  # padding gets no routed-expert output
  _close(np.asarray(y)[~real], np.asarray(shared_only)[~real])


@pytest.mark.parametrize("B", [3, 5])
def test_batch_not_dividing_the_mesh_is_padded_not_switched(tiny, moe_case, B):
  """8 batch shards, B rows: the layer pads to 8 masked rows and runs the same capacity-limited function."""
  boxed, x, _ = moe_case
  p, x = layers.unbox(boxed), x[:B]
  mesh = sharding.make_mesh(MESHES["ep8"])
  cfg, compute = tiny.model, tiny.compute  # dropless first: equal to the reference
  y_ref, stats_ref = jax.jit(moe.dropless_reference, static_argnums=(2, 3))(p, x, cfg, compute)
  with jax.set_mesh(mesh):
    p_sharded = jax.device_put(p, layers.shardings(boxed, mesh))
    y, stats = jax.jit(moe.apply, static_argnums=(2, 3))(p_sharded, x, cfg, compute)
    assert y.shape == x.shape and stats["experts"].shape == (B, x.shape[1], cfg.n_activated_experts)
    _close(y, y_ref)
    np.testing.assert_array_equal(stats["load"], stats_ref["load"])
    # With capacity, each real row is one shard's tokens and the padding rows claim no rows.
    compute = dataclasses.replace(tiny.compute, capacity_factor=0.5)
    _, stats = jax.jit(moe.apply, static_argnums=(2, 3))(p_sharded, x, cfg, compute)
  L, K, E = x.shape[1], cfg.n_activated_experts, cfg.n_routed_experts
  C = math.ceil(0.5 * L * K / E)
  keep = numpy_kept(np.asarray(stats_ref["experts"]).reshape(B, L * K), C, E)
  assert int(stats["dropped_pairs"]) == (~keep).sum() > 0


# -------------------------------------------------------------------------------------- whole model


@pytest.fixture(scope="module")
def run_cfg(tiny):
  # No MTP here to halve compile time: its block is the same MoE path (test_multiprocess runs it on expert=8).
  return dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, n_mtp=0),
                             compute=dataclasses.replace(tiny.compute, bias_update_speed=0.01))


@pytest.fixture(scope="module")
def model_case(run_cfg):
  tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, run_cfg.model.vocab_size)
  batch = Batch(tokens, jnp.roll(tokens, -1, axis=1), jnp.ones_like(tokens))
  params = model.init(run_cfg.model, run_cfg.compute, jax.random.key(0))
  return params, batch, _model_grad(params, batch, run_cfg)


def _model_grad(params, batch, cfg):
  def fn(params, batch):
    (loss, (metrics, router)), grads = jax.value_and_grad(train.loss_fn, has_aux=True)(params, batch, cfg.model,
                                                                                        cfg.compute)
    return loss, router, grads, model.update_router_bias(params, router, cfg.compute.bias_update_speed)

  return jax.jit(fn)(params, batch)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_model_forward_backward_and_bias_match_reference(run_cfg, model_case, mesh_name):
  params_ref, batch, (loss_ref, router_ref, grads_ref, updated_ref) = model_case
  cfg = run_cfg
  mesh = sharding.make_mesh(MESHES[mesh_name])
  with jax.set_mesh(mesh):
    params = jax.device_put(params_ref, model.param_shardings(cfg.model, cfg.compute, mesh))
    loss, router, grads, updated = _model_grad(params, batch, cfg)
  _close(loss, loss_ref, 1e-5)
  _close(grads, grads_ref, 1e-4)
  load = np.asarray(router["moe_layers"]["load"])
  np.testing.assert_array_equal(load, router_ref["moe_layers"]["load"])
  assert (load.sum(-1) == 8 * 16 * cfg.model.n_activated_experts).all()  # loads sum to tokens x top-k
  bias = updated["moe_layers"]["ffn"]["router"]["bias"]
  shards = [np.asarray(s.data) for s in bias.addressable_shards]
  assert len(shards) == 8 and all(np.array_equal(shards[0], s) for s in shards)  # one bias on every replica
  np.testing.assert_array_equal(shards[0], updated_ref["moe_layers"]["ffn"]["router"]["bias"])
