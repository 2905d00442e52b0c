"""The KV-cache sampler against full forward passes (no cache), the absorbed MLA decode against the
decompressed path, sampling rules against hand-built distributions, and the mesh path against one device.

All comparisons run in fp32 with init_std 0.2, so the top logits of a random model are far apart compared
with fp32 rounding (greedy argmax cannot flip between two correct implementations)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, model, sampler, sharding
from r1jax.config import SamplerConfig
from r1jax.nn import attention, block, mla

_apply = jax.jit(model.apply, static_argnums=(2, 3))  # the training forward; op by op it takes ~10 s

EOS = 2
GREEDY = SamplerConfig(max_new_tokens=12, temperature=0.0, steps_per_call=5)
PROMPTS = [[1, 5, 9, 3, 7], [1, 4], [1, 8, 8, 6, 2, 11, 40, 3, 9]]  # lengths 5, 2, 9: right padding in one batch


def _cfg(path: str, *overrides):
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  run = config.load(os.path.join(root, path), ["compute.dtype=float32", "compute.init_std=0.2", *overrides])
  return run.model, run.compute


@pytest.fixture(scope="module")
def mla_case():
  cfg, compute = _cfg("tiny.yaml")
  return cfg, compute, model.init(cfg, compute, jax.random.key(1))


@pytest.fixture(scope="module")
def gqa_case():
  cfg, compute = _cfg("tiny_dense_student.yaml")
  return cfg, compute, model.init(cfg, compute, jax.random.key(2))


def _completions(rollout):
  return sampler.completions(rollout)


@pytest.mark.parametrize("case", ["mla_case", "gqa_case"])
def test_greedy_with_cache_equals_full_forward_passes(case, request):
  cfg, compute, params = request.getfixturevalue(case)
  ref = sampler.greedy_full_forward(params, PROMPTS, cfg, compute, GREEDY.max_new_tokens, eos_id=-1)
  out = sampler.generate(params, PROMPTS, cfg, compute, GREEDY, eos_id=-1)
  assert _completions(out) == ref
  assert np.asarray(out.truncated_B).all() and (np.asarray(out.completion_len_B) == GREEDY.max_new_tokens).all()


def test_absorbed_mla_decode_equals_the_decompressed_path(mla_case):
  """Token-by-token absorbed decode over the latent cache == mla.apply on the whole sequence."""
  cfg, compute, params = mla_case
  p = jax.tree.map(lambda a: a[0], params["moe_layers"]["attn"])
  B, L = 2, 11
  x_BxLxD = jax.random.normal(jax.random.key(3), (B, L, cfg.dim))
  ref = mla.apply(p, x_BxLxD, *model.rope.cos_sin(jnp.broadcast_to(jnp.arange(L), (B, L)), cfg),
                  attention.Mask(), cfg, compute)
  cache = mla.init_cache(cfg, B, L, jnp.float32)
  outs = []
  for t in range(L):
    ctx = model.decode_context(jnp.full((B,), t, jnp.int32), 1, cfg)
    y, cache = mla.apply_cached(p, x_BxLxD[:, t:t + 1], ctx.cos, ctx.sin, ctx.mask, cache, ctx.write_B, cfg, compute)
    outs.append(y)
  # the absorbed form sums over the latent instead of the head dims: fp32 rounding, outputs of size ~5
  np.testing.assert_allclose(np.concatenate(outs, axis=1), ref, rtol=1e-5, atol=2e-5)


def test_mla_cache_holds_the_latent_and_the_rope_key_only(mla_case):
  cfg, compute, _ = mla_case
  cache = model.init_cache(cfg, compute, 3, 20)
  per_token_per_layer = sum(v.shape[-1] for v in cache["moe_layers"].values())
  assert per_token_per_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 48
  assert {k: v.shape for k, v in cache["moe_layers"].items()} == {
      "latent": (cfg.n_moe_layers, 3, 20, cfg.kv_lora_rank + cfg.qk_rope_head_dim)}
  # a full per-head cache would hold keys (nope + rope) and values for every head
  full = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  assert per_token_per_layer / full == 48 / 320


def test_logprobs_equal_the_training_forward(mla_case):
  """Sampled at temperature 1 without truncation: the returned log-probs are the model's."""
  cfg, compute, params = mla_case
  scfg = SamplerConfig(max_new_tokens=8, temperature=1.0, steps_per_call=3)
  out = sampler.generate(params, PROMPTS, cfg, compute, scfg, eos_id=EOS, key=jax.random.key(7))
  tokens, mask = np.asarray(out.tokens_BxS), np.asarray(out.completion_mask_BxS)
  logits = _apply(params, jnp.asarray(tokens), cfg, compute).logits_BxLxV
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  B, S = tokens.shape
  ref = np.zeros((B, S))
  ref[:, 1:] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs_BxS) * mask, ref * mask, rtol=1e-4, atol=1e-4)
  assert mask.sum() == np.asarray(out.completion_len_B).sum() > 0


def test_top_k_and_top_p_keep_exactly_the_expected_sets():
  probs = np.array([[0.05, 0.4, 0.1, 0.3, 0.15]])
  logits = jnp.log(jnp.asarray(probs))
  keep = lambda k, p: np.asarray(sampler.truncation_mask(logits, k, p))[0].tolist()  # noqa: E731
  assert keep(2, 1.0) == [False, True, False, True, False]
  assert keep(0, 0.7) == [False, True, False, True, False]  # 0.4 + 0.3 reaches 0.7
  assert keep(0, 0.71) == [False, True, False, True, True]  # needs the 0.15 too
  assert keep(0, 0.3) == [False, True, False, False, False]  # the top token alone
  assert keep(3, 0.95) == [False, True, False, True, True]  # top-k first, then the nucleus within it
  draws = jax.vmap(lambda k: sampler.sample(logits, k, SamplerConfig(top_p=0.7))[0])(
      jax.random.split(jax.random.key(0), 2000))
  counts = np.bincount(np.asarray(draws).ravel(), minlength=5)
  assert counts[[0, 2, 4]].sum() == 0
  np.testing.assert_allclose(counts[1] / counts.sum(), 0.4 / 0.7, atol=0.04)  # renormalised nucleus


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (5, 1.0), (5, 0.9), (0, 1.0)])
def test_the_recorded_threshold_is_the_kept_set(top_k, top_p):
  """{z >= keep_min} is exactly truncation_mask's set (the learner's keep sampling mask), the threshold strictly
  between the kept and the dropped logits; -inf when nothing is cut."""
  logits = jax.random.normal(jax.random.key(3), (64, 50)) * 3
  scfg = SamplerConfig(temperature=0.7, top_k=top_k, top_p=top_p)
  _, _, thr = sampler.sample(logits, jax.random.key(0), scfg)
  z = np.asarray(logits, np.float32) / 0.7
  keep = np.asarray(sampler.truncation_mask(jnp.asarray(z), top_k, top_p))
  np.testing.assert_array_equal(z >= np.asarray(thr)[:, None], keep)
  assert (np.asarray(thr) == -np.inf).all() == keep.all()
  if not keep.all():
    assert (np.where(keep, z, np.inf).min(-1) > np.asarray(thr)).all()


def test_rows_stop_at_eos_independently(mla_case):
  cfg, compute, params = mla_case
  free = sampler.greedy_full_forward(params, PROMPTS, cfg, compute, GREEDY.max_new_tokens, eos_id=-1)
  eos = free[0][3]  # row 0 emits this at step 4; other rows stop at their first occurrence, if any
  out = sampler.generate(params, PROMPTS, cfg, compute, GREEDY, eos_id=eos)
  expected = [row[:row.index(eos) + 1] if eos in row else row for row in free]
  assert _completions(out) == expected
  assert np.asarray(out.truncated_B).tolist() == [eos not in row for row in free]


def test_any_of_several_stop_ids_ends_a_row(mla_case):
  """A chat model ends a turn with one id and a text with another (generation_config's eos_token_id list)."""
  cfg, compute, params = mla_case
  free = sampler.greedy_full_forward(params, PROMPTS, cfg, compute, GREEDY.max_new_tokens, eos_id=-1)
  stops = {free[0][3], free[1][1]}
  out = sampler.generate(params, PROMPTS, cfg, compute, GREEDY, eos_id=sorted(stops))
  first_stop = [next((i for i, t in enumerate(row) if t in stops), None) for row in free]
  expected = [row if i is None else row[:i + 1] for row, i in zip(free, first_stop)]
  assert _completions(out) == expected
  assert np.asarray(out.truncated_B).tolist() == [i is None for i in first_stop]
  assert sampler.greedy_full_forward(params, PROMPTS, cfg, compute, GREEDY.max_new_tokens,
                                     eos_id=sorted(stops)) == expected


def test_mtp_speculative_decoding_equals_greedy(mla_case):
  cfg, compute, params = mla_case
  spec = dataclasses.replace(GREEDY, speculative=True, max_new_tokens=15)
  plain = sampler.generate(params, PROMPTS, cfg, compute, dataclasses.replace(spec, speculative=False), eos_id=-1)
  fast = sampler.generate(params, PROMPTS, cfg, compute, spec, eos_id=-1)
  assert _completions(fast) == _completions(plain)
  np.testing.assert_allclose(fast.logprobs_BxS, plain.logprobs_BxS, rtol=1e-4, atol=1e-5)
  assert int(fast.steps) <= int(plain.steps)


def test_no_recompilation_for_new_prompts_of_the_same_shapes(mla_case):
  cfg, compute, params = mla_case
  scfg = dataclasses.replace(GREEDY, max_new_tokens=6)
  sampler.generate(params, PROMPTS, cfg, compute, scfg, eos_id=EOS)
  sizes = sampler.prefill_jit._cache_size(), sampler.decode_chunk_jit._cache_size()
  other = [[1, 20, 21], [1, 9, 9, 9, 9, 9, 9], [1]]  # different lengths, same 16-token bucket and row count
  sampler.generate(params, other, cfg, compute, scfg, eos_id=EOS)
  assert (sampler.prefill_jit._cache_size(), sampler.decode_chunk_jit._cache_size()) == sizes


@pytest.mark.parametrize("mesh_overrides", [["mesh.data=2", "mesh.expert=4"],
                                            ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
                                            ["mesh.data=2", "mesh.context=4"]])  # prefill split over context
def test_sharded_generation_equals_one_device(mla_case, mesh_overrides):
  """The training shardings on 8 fake devices; 3 prompts do not divide the batch axes (padded rows)."""
  cfg, compute, params = mla_case
  mesh = sharding.make_mesh(config.apply_overrides(config.RunConfig(model=cfg, compute=compute), mesh_overrides).mesh)
  ref = sampler.generate(params, PROMPTS, cfg, compute, GREEDY, eos_id=-1)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, model.param_shardings(cfg, compute, mesh))
    out = sampler.generate(sharded, PROMPTS, cfg, compute, GREEDY, eos_id=-1)
  assert _completions(out) == _completions(ref)
  for name in ref.experts:
    np.testing.assert_array_equal(sampler.to_host(out.experts[name]), ref.experts[name])


def test_recorded_experts_replay_the_sampler_routing(mla_case):
  """Every fed token's recorded experts equal what the training forward routes it to."""
  cfg, compute, params = mla_case
  out = sampler.generate(params, PROMPTS, cfg, compute, GREEDY, eos_id=-1)
  fwd = _apply(params, out.tokens_BxS, cfg, compute).router["moe_layers"]["experts"]
  fed = np.asarray(out.experts["moe_layers"]) >= 0
  assert fed.any()
  np.testing.assert_array_equal(np.asarray(out.experts["moe_layers"])[fed], np.asarray(fwd)[fed])
  # replaying the record (-1: never fed, routed freely) reproduces the forward's routing; other ids are obeyed
  routes = out.experts["moe_layers"]
  replayed = _apply(params, out.tokens_BxS, cfg, compute, routes={"moe_layers": routes}).router["moe_layers"]
  np.testing.assert_array_equal(replayed["experts"], fwd)
  shifted = jnp.where(routes >= 0, (routes + 1) % cfg.n_routed_experts, -1)
  forced = _apply(params, out.tokens_BxS, cfg, compute, routes={"moe_layers": shifted}).router["moe_layers"]
  np.testing.assert_array_equal(np.asarray(forced["experts"])[fed], np.asarray(shifted)[fed])
  assert block.cache_names(cfg) is mla.CACHE_NAMES


@pytest.mark.parametrize("case", ["mla_case", "gqa_case"])
def test_per_layer_weights_sample_what_the_stacked_layer_scan_does(case, request):
  """sampler.per_layer_weights (the default: decode unrolled over model.per_layer's arrays) against the layer
  scan over the stacked weights: the same tokens and routes; log-probs to fp32 rounding (the same arithmetic,
  compiled as another program)."""
  cfg, compute, params = request.getfixturevalue(case)
  scfg = SamplerConfig(max_new_tokens=8, temperature=1.0, top_k=20, steps_per_call=3)
  layers = model.per_layer(params)
  assert isinstance(layers["moe_layers" if cfg.n_moe_layers else "dense_layers"], tuple)
  unrolled = sampler.generate(params, PROMPTS, cfg, compute, scfg, eos_id=EOS, key=jax.random.key(4))
  stacked = sampler.generate(params, PROMPTS, cfg, compute, dataclasses.replace(scfg, per_layer_weights=False),
                             eos_id=EOS, key=jax.random.key(4))
  assert _completions(unrolled) == _completions(stacked)
  np.testing.assert_allclose(unrolled.logprobs_BxS, stacked.logprobs_BxS, rtol=1e-5, atol=1e-6)
  for name in stacked.experts:
    np.testing.assert_array_equal(unrolled.experts[name], stacked.experts[name])
