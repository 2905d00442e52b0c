"""Asynchronous rollouts (grpo.async_rollouts): sampling and learning overlap on disjoint devices.

The mesh's devices split in two (sharding.sub_meshes, mesh.rollout_devices): a sampler thread generates
step k's rollouts on the sampler sub-mesh while the learner trains step k - 1, k - 2, ... on its own. The
learner pushes its weights to the sampler every grpo.sync_every updates (a cross-mesh copy, nothing on the
host), and the sampler never uses weights older than grpo.max_staleness updates.

The schedule is fixed, not raced: rollout k (1-based) samples with the weights after update
  p(k) = sync_every * ceil(max(0, k - 1 - max_staleness) / sync_every),
the oldest pushed version the staleness bound allows, and waits for it if the learner is not there yet.
So staleness k - 1 - p(k) never exceeds max_staleness (nothing is ever too old to use, so nothing is dropped),
every step's metric `staleness` says how old its rollouts were, and a run is deterministic: the same config
and seed give the same metrics whatever the threads' timing. max_staleness 0 (with sync_every 1) is the
synchronous loop on two sub-meshes. The gap between sampler and learner policies is what rl/corrections.py
corrects: importance weights against the sampler's recorded log-probs and V3.2's off-policy sequence masking.

Checkpoints hold the learner's step only. Rollouts sampled ahead are dropped on a stop; on resume their steps'
prompts (a pure function of seed and step) are sampled again, with the restored weights (the freshest there
are), so no prompt is lost or trained twice; only their staleness differs from an uninterrupted run's.
"""

from __future__ import annotations

import math
import queue
import threading
import time

import jax

from r1jax import sharding
from r1jax.batch import Batch
from r1jax.config import ConfigError, RunConfig
from r1jax.rl import rollouts


def sampled_version(k: int, sync_every: int, max_staleness: int) -> int:
  """The learner version (updates done) whose weights rollout k (1-based) samples with."""
  return sync_every * math.ceil(max(0, k - 1 - max_staleness) / sync_every)


class _Closed(Exception):
  """The source was closed while its thread waited."""


class AsyncRolloutSource:
  """loop.fit's GRPO source with a sampler thread on its own sub-mesh (see the module docstring)."""

  def __init__(self, cfg: RunConfig, learner_mesh, sampler_mesh, ref_logp_fn=None, samples_path=None):
    g = cfg.grpo
    rows = g.prompts_per_step * g.group_size
    if rows % sharding.batch_size_multiple(learner_mesh):
      raise ConfigError(f"grpo.prompts_per_step * grpo.group_size = {rows}: must be a multiple of "
                        f"{sharding.batch_size_multiple(learner_mesh)}, the learner sub-mesh's batch devices")
    sharding.validate_mesh(cfg.model, cfg.compute, sampler_mesh)
    self.cfg, self.mesh, self.sampler_mesh, self.ref_logp_fn = cfg, learner_mesh, sampler_mesh, ref_logp_fn
    self.inner = rollouts.RolloutSource(cfg, sampler_mesh, None, samples_path)
    self.step = 0  # learner steps done (what a checkpoint holds)
    self._versions: dict[int, dict] = {}  # learner version -> its params on the sampler mesh
    self._cond = threading.Condition()
    self._queue: queue.Queue = queue.Queue(maxsize=g.max_staleness + 1)
    self._thread: threading.Thread | None = None
    self._closing = False
    self._first = 1

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict):
    if self._thread is not None:
      raise RuntimeError("AsyncRolloutSource.set_state after rollouts started")
    self.step = int(state["step"])

  def _version(self, k: int) -> int:
    g = self.cfg.grpo
    # After a resume at step first - 1 only that version exists: rollouts that would have used an older one
    # take it (fresher, never staler).
    return max(sampled_version(k, g.sync_every, g.max_staleness), self._first - 1)

  def _publish(self, version: int, params):
    """Copy the learner's weights after `version` updates to the sampler mesh, if some rollout needs them."""
    g = self.cfg.grpo
    if version != self._first - 1 and version % g.sync_every:
      return
    copy = jax.device_put(params, jax.tree.map(
        lambda x: jax.sharding.NamedSharding(self.sampler_mesh, x.sharding.spec), params))
    jax.block_until_ready(copy)  # the learner's buffers are donated to the next step
    with self._cond:
      self._versions[version] = copy
      self._cond.notify_all()

  def _wait_for(self, version: int) -> dict:
    with self._cond:
      self._cond.wait_for(lambda: version in self._versions or self._closing)
      if self._closing:
        raise _Closed
      for old in [v for v in self._versions if v < version]:  # no later rollout needs an older version
        del self._versions[old]
      return self._versions[version]

  def _put(self, item):
    while not self._closing:
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue
    raise _Closed

  def _produce(self, first: int):
    try:
      with jax.set_mesh(self.sampler_mesh):
        for k in range(first, self.cfg.train.steps + 1):
          version, t_wait = self._version(k), time.perf_counter()
          params = self._wait_for(version)
          t_ready = time.perf_counter()
          host, info, samples = self.inner.rollout(k - 1, params)
          # staleness: updates between the sampling weights and the learner's; sampler_wait_s: the sampler's
          # idle time waiting for those weights (the learner's turn to be slow).
          info.update(staleness=float(k - 1 - version), sampler_wait_s=t_ready - t_wait)
          self._put((k, version, host, info, samples))
    except _Closed:
      pass
    except BaseException as e:  # handed to the learner, which raises it
      try:
        self._put(e)
      except _Closed:
        pass

  def next_batch(self, state) -> tuple[Batch, dict]:
    k = self.step + 1
    t0 = time.perf_counter()
    if self._thread is None:
      self._first = k
    self._publish(k - 1, state.params)
    if self._thread is None:
      self._thread = threading.Thread(target=self._produce, args=(k,), name="r1jax-rollouts", daemon=True)
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    got, version, host, info, samples = item
    if got != k:
      raise RuntimeError(f"async rollouts: the learner is at step {k}, the sampler delivered step {got}")
    self.inner.write_samples(samples)
    batch = sharding.global_batch(host, self.mesh)
    if self.ref_logp_fn is not None:
      batch = batch._replace(ref_logp_BxL=self.ref_logp_fn(batch))
    info["rollout_wait_s"] = time.perf_counter() - t0  # the learner's idle time: 0 when sampling keeps up
    self.step = k
    return batch, info

  def close(self):
    """Stop the sampler thread (rollouts sampled ahead are dropped: their steps are sampled again on resume)."""
    with self._cond:
      self._closing = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join()
    self._versions.clear()
