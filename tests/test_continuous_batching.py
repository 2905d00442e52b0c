"""continuous_batching.py: a fixed number of decode slots refilled from the queue gives sampler.generate's
rollout for the same key, row for row (greedy and sampled, EOS and per-prompt budgets, MLA and GQA, on one
device and on a mesh), with one compilation for every refill."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from r1jax import config, continuous_batching, model, sampler, sharding
from r1jax.config import ConfigError, MeshConfig, SamplerConfig

EOS = list(range(2, 60))  # many stop ids (as a chat model has a few): random weights stop some rows early
PROMPTS = [[1, 5, 9, 3, 7], [1, 4], [1, 8, 8, 6, 2, 11, 40, 3, 9], [1, 3], [1, 7, 7, 7], [1, 12, 5], [1, 6],
           [1, 9, 9, 9, 9, 9, 9], [1, 10, 4, 4]]
BUDGETS = [3, 11, 2, 7, 1, 9, 4, 12, 5]  # long-tailed like R1's: slots free at different steps


def _cfg(path: str):
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  run = config.load(os.path.join(root, path), ["compute.dtype=float32", "compute.init_std=0.2"])
  return run.model, run.compute


@pytest.fixture(scope="module", params=["tiny.yaml", "tiny_dense_student.yaml"])
def case(request):
  cfg, compute = _cfg(request.param)
  return cfg, compute, model.init(cfg, compute, jax.random.key(1))


def _assert_same(got, want):
  """Tokens, masks, lengths and experts exactly; log-probs and kept-set thresholds to fp32 rounding (the
  same per-row computation inside programs compiled for another batch size)."""
  for name in ("tokens_BxS", "prompt_len_B", "completion_len_B", "completion_mask_BxS", "truncated_B"):
    np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)
  for name in ("logprobs_BxS", "keep_min_BxS"):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=1e-5,
                               atol=1e-5, err_msg=name)
  for k in want.experts:
    np.testing.assert_array_equal(np.asarray(got.experts[k]), np.asarray(want.experts[k]), err_msg=k)


@pytest.mark.parametrize("scfg", [SamplerConfig(max_new_tokens=12, temperature=0.0, steps_per_call=3),
                                  SamplerConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9,
                                                steps_per_call=4)], ids=["greedy", "sampled"])
def test_continuous_equals_static(case, scfg):
  """3 slots for 9 prompts with budgets 1 to 12: most prompts start in a slot another has left."""
  cfg, compute, params = case
  key = jax.random.key(7)
  want = sampler.generate(params, PROMPTS, cfg, compute, scfg, eos_id=EOS, key=key, max_new=BUDGETS)
  got = continuous_batching.generate(params, PROMPTS, cfg, compute, scfg, slots=3, eos_id=EOS, key=key,
                                     max_new=BUDGETS)
  assert np.asarray(want.completion_len_B).tolist() != BUDGETS  # some rows stop at EOS, the others at budget
  _assert_same(got, want)
  assert int(got.steps) < int(want.steps) * len(PROMPTS) / 3  # 3 slots finish in fewer steps than 3 static batches


def test_rollouts_take_slots_from_the_config(case):
  """sampler.slots routes rollouts (GRPO's) through continuous batching, with the same samples."""
  cfg, compute, params = case
  scfg = SamplerConfig(max_new_tokens=8, temperature=1.0, steps_per_call=2)
  kw = dict(eos_id=EOS, key=jax.random.key(4))
  want = continuous_batching.rollout(params, PROMPTS, cfg, compute, scfg, **kw)
  got = continuous_batching.rollout(params, PROMPTS, cfg, compute, dataclasses.replace(scfg, slots=2), **kw)
  _assert_same(got, want)
  with pytest.raises(ConfigError, match="sampler.slots=2: continuous batching does not run MTP"):
    config.load_dict({"sampler": {"slots": 2, "speculative": True, "temperature": 0}}, "x.yaml")


def test_a_prompts_sample_does_not_depend_on_its_batch():
  """Per-prompt keys: prompt i sampled alone (as index i) or among others gives the same tokens."""
  cfg, compute = _cfg("tiny.yaml")
  params = model.init(cfg, compute, jax.random.key(1))
  scfg = SamplerConfig(max_new_tokens=6, temperature=1.0)
  key = jax.random.key(3)
  all_rows = sampler.completions(sampler.generate(params, PROMPTS[:4], cfg, compute, scfg, eos_id=-1, key=key))
  swapped = sampler.completions(sampler.generate(params, PROMPTS[:2], cfg, compute, scfg, eos_id=-1, key=key))
  assert swapped == all_rows[:2] and len(set(map(tuple, all_rows))) == 4


def test_on_a_mesh_and_without_recompiling_per_prompt():
  """data=2 x fsdp=2 x expert=2 (slots rounded up to the batch multiple, 8): equals the static rollout; the
  refill and decode programs compile per input layout, never per refill."""
  cfg, compute = _cfg("tiny.yaml")
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, expert=2))
  scfg = SamplerConfig(max_new_tokens=12, temperature=1.0, steps_per_call=3)
  prompts, budgets = PROMPTS * 2, BUDGETS[::-1] * 2
  with jax.set_mesh(mesh):
    params = model.init(cfg, compute, jax.random.key(1), mesh)
    want = sampler.generate(params, prompts, cfg, compute, scfg, eos_id=EOS, max_new=budgets)
    got = continuous_batching.generate(params, prompts, cfg, compute, scfg, slots=5, eos_id=EOS, max_new=budgets)
    _assert_same(got, want)
    traced, listening = [], [True]  # JAX cannot unregister a listener: this one goes quiet after the call
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: traced.append(event) if listening and event.endswith("jaxpr_trace_duration") else None)
    again = continuous_batching.generate(params, prompts[::-1], cfg, compute, scfg, slots=5, eos_id=EOS,
                                         max_new=budgets[::-1], key=jax.random.key(9))
    listening.clear()
    assert traced == []  # its refills and decode chunks reuse the first call's programs
    assert int(again.steps) > max(budgets)  # several slots' worth of refills ran


def test_bad_budgets_and_speculation_are_refused():
  cfg, compute = _cfg("tiny.yaml")
  params = model.init(cfg, compute, jax.random.key(1))
  with pytest.raises(ConfigError, match="one positive budget per prompt"):
    continuous_batching.generate(params, PROMPTS, cfg, compute, SamplerConfig(), slots=2, eos_id=EOS,
                                 max_new=[1, 2])
  with pytest.raises(ConfigError, match="does not run MTP speculative decoding"):
    continuous_batching.generate(params, PROMPTS, cfg, compute, SamplerConfig(temperature=0, speculative=True),
                                 slots=2, eos_id=EOS)
