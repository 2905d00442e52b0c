"""Context parallelism on 8 simulated devices: sequences split over the `context` mesh axis (attention blockwise
over the gathered keys) give one device's logits (attention by the XLA reference), losses (balance loss
included, with packed sequences that cross shard edges) and gradients, YaRN positions included; no shard sees
a future token; a length the axis does not divide is refused in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import model, sharding, train
from r1jax.batch import Batch
from r1jax.config import ConfigError, MeshConfig, ModelConfig

B, L = 2, 32  # 8 positions per shard at context=4


def _one_device():
  return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


MESHES = {"context4": MeshConfig(data=2, context=4),
          "context2_expert2_fsdp2": MeshConfig(data=1, fsdp=2, expert=2, context=2)}


def _batch(cfg, packed: bool) -> Batch:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (B, L + 1)).astype(np.int32)
  seg = positions = None
  mask = np.ones((B, L), np.int32)
  if packed:  # row 0: a sequence spanning shards 0-2 (context 4) and runs that end on shard edges; row 1: many
    lengths = [[5, 14, 5, 8], [3, 3, 10, 1, 7, 8]]
    seg = np.stack([np.repeat(np.arange(len(n)), n) for n in lengths]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in ns]) for ns in lengths]).astype(np.int32)
    mask[1, -8:] = 0  # padding at the end of row 1: its own segment, no loss, no expert statistics
  loss_mask = mask.copy()
  return Batch(tokens_BxL=tokens[:, :L], targets_BxL=tokens[:, 1:], loss_mask_BxL=loss_mask, token_mask_BxL=mask,
               positions_BxL=positions, segment_ids_BxL=seg)


def _run(cfg, mesh, batch):
  """Logits, router statistics, the training loss and its gradients on `mesh`."""
  with jax.set_mesh(mesh):
    params = model.init(cfg.model, cfg.compute, jax.random.key(0), mesh)
    b = jax.tree.map(lambda x: None if x is None else jnp.asarray(x), batch)
    out = jax.jit(lambda p: model.apply(p, b.tokens_BxL, cfg.model, cfg.compute, positions_BxL=b.positions_BxL,
                                        segment_ids_BxL=b.segment_ids_BxL, token_mask_BxL=b.token_mask_BxL))(params)
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(
        lambda p: train.loss_fn(p, b, cfg.model, cfg.compute), has_aux=True))(params)
    if sharding.context_size(mesh) > 1:  # the sequence really is split
      assert out.logits_BxLxV.sharding.shard_shape(out.logits_BxLxV.shape)[1] == L // sharding.context_size(mesh)
    return jax.device_get((out.logits_BxLxV, out.mtp_logits_PxBxLxV, out.router, loss, metrics, grads))


@pytest.fixture(scope="module")
def fp32(tiny):
  """fp32, and blocks of 8 keys: under context=4 auto runs blockwise attention, whose shard s (queries 8s to
  8s + 7) then visits four key blocks, before, at and after its own slice of the sequence."""
  return dataclasses.replace(tiny, compute=dataclasses.replace(tiny.compute, dtype="float32", attention_block=8))


@pytest.fixture(scope="module")
def one_device(fp32):
  """The reference runs, once per batch kind."""
  return {packed: _run(fp32, _one_device(), _batch(fp32, packed)) for packed in (False, True)}


@pytest.mark.parametrize("mesh_name, packed", [("context4", False), ("context4", True),
                                               ("context2_expert2_fsdp2", True)])
def test_context_parallel_equals_one_device(fp32, one_device, mesh_name, packed):
  """fp32 throughout: the only differences are summation orders (attention over gathered keys, the
  all-to-all's rows, gradient reductions over 8 shards); tolerances as the data-parallel test's."""
  assert fp32.model.rope_scaling == "yarn"  # the tiny preset's YaRN positions, split across shards
  one = one_device[packed]
  ctx = _run(fp32, sharding.make_mesh(MESHES[mesh_name]), _batch(fp32, packed))
  for a, b in zip(jax.tree.leaves(ctx[:2]), jax.tree.leaves(one[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for key in ("load", "dropped_pairs", "experts"):
    np.testing.assert_array_equal(ctx[2]["moe_layers"][key], one[2]["moe_layers"][key], err_msg=key)
  np.testing.assert_allclose(ctx[2]["moe_layers"]["aux_loss"], one[2]["moe_layers"]["aux_loss"], rtol=1e-5)
  np.testing.assert_allclose(ctx[3], one[3], rtol=1e-5)
  for key in ("ce", "mtp_loss", "aux_loss"):
    np.testing.assert_allclose(ctx[4][key], one[4][key], rtol=1e-5, err_msg=key)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ctx[5])[0], jax.tree.leaves(one[5])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_no_shard_sees_a_future_token(fp32):
  """A token changed at position j (shard 1 of 4) moves no logit before j, on its own shard or an earlier one."""
  cfg, compute = fp32.model, fp32.compute
  tokens = jax.random.randint(jax.random.key(1), (2, L), 0, cfg.vocab_size)
  j = 11
  changed = tokens.at[:, j].set((tokens[:, j] + 7) % cfg.vocab_size)
  mesh = sharding.make_mesh(MeshConfig(data=2, context=4))
  with jax.set_mesh(mesh):
    params = model.init(cfg, compute, jax.random.key(0), mesh)
    fwd = jax.jit(lambda t: model.apply(params, t, cfg, compute).logits_BxLxV)
    a, b = np.asarray(fwd(tokens)), np.asarray(fwd(changed))
  np.testing.assert_array_equal(a[:, :j], b[:, :j])
  assert not np.allclose(a[:, j], b[:, j])


def test_a_length_the_context_axis_does_not_divide_is_refused(fp32):
  mesh = sharding.make_mesh(MeshConfig(data=2, context=4))
  with pytest.raises(ConfigError, match="train.seq_len=30: must be a multiple of mesh.context=4"):
    sharding.validate_mesh(fp32.model, fp32.compute, mesh, seq_len=30)


def test_the_balance_loss_joins_sequences_across_shards():
  """sequence_aux_loss on 4 shards of one row equals one device's, for runs that span 1, 2 and 4 shards."""
  from r1jax.nn import moe

  cfg = dataclasses.replace(ModelConfig(), n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                            n_limited_groups=1)
  rng = np.random.default_rng(3)
  T = 32
  mesh = sharding.make_mesh(MeshConfig(data=2, context=4))
  P = jax.sharding.PartitionSpec

  def shard(m, s, sc, ex):
    r = moe.Routing(jnp.ones((ex.shape[0], 2)), ex, sc)
    total, n = moe.sequence_aux_loss(r, moe.Tokens(m, s), cfg, 0.5, ("context",))
    return jax.lax.psum(total, "context"), jax.lax.psum(n, "context")

  split = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(None, "context"), P(None, "context"), P("context"),
                                                            P("context")), out_specs=(P(), P())))
  for lengths in ([32], [3, 13, 16], [8, 8, 8, 8], [1, 30, 1], [9, 9, 9, 5]):
    seg = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)[None]
    mask = (rng.random((1, T)) > 0.1).astype(np.int32)
    scores = jnp.asarray(rng.random((T, 8)), jnp.float32)
    experts = jnp.asarray(np.argsort(rng.random((T, 8)), axis=1)[:, :2], jnp.int32)
    routing = moe.Routing(jnp.ones((T, 2)), experts, scores)
    want = moe.sequence_aux_loss(routing, moe.Tokens(jnp.asarray(mask), jnp.asarray(seg)), cfg, 0.5)
    got = split(jnp.asarray(mask), jnp.asarray(seg), scores, experts)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, err_msg=str(lengths))
    assert float(got[1]) == float(want[1]), lengths
