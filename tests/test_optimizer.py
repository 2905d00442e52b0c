"""AdamW decays weight matrices only: stacked layers give norm gains and biases a leading axis, so the
decision comes from logical names, checked here against lists written out by hand."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, model, train

ROOT = Path(__file__).resolve().parents[1]

_MLA = ["attn/wq_a", "attn/wq_b", "attn/wkv_a", "attn/wkv_b", "attn/wo"]
_MLP = ["ffn/w_gate", "ffn/w_up", "ffn/w_down"]
_MOE = ["ffn/router/w", "ffn/experts/w_gate", "ffn/experts/w_up", "ffn/experts/w_down", "ffn/shared/w_gate",
        "ffn/shared/w_up", "ffn/shared/w_down"]
DECAYED = {
    "tiny.yaml": {"embed", "head", *(f"dense_layers/{n}" for n in _MLA + _MLP),
                  *(f"moe_layers/{n}" for n in _MLA + _MOE), "mtp/proj", *(f"mtp/block/{n}" for n in _MLA + _MOE)},
    # Tied embeddings: no head. The q/k/v biases and all norms are vectors.
    "tiny_dense_student.yaml": {"embed", *(f"dense_layers/attn/{w}" for w in ["wq", "wk", "wv", "wo"]),
                                *(f"dense_layers/{n}" for n in _MLP)},
}


def _flat(tree) -> dict:
  return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("preset", sorted(DECAYED))
def test_decayed_leaves_are_the_matrices(preset):
  cfg = config.load(ROOT / "configs" / preset).model
  decayed = {name for name, d in _flat(model.decay_mask(cfg)).items() if d}
  assert decayed == DECAYED[preset]


@pytest.mark.parametrize("preset", sorted(DECAYED))
def test_adamw_step_on_zero_grads_shrinks_matrices_only(preset):
  """With zero gradients Adam's update is 0, so only decoupled decay moves a leaf: p <- p (1 - lr wd).
  (optax scales decay by the learning rate, so lr 0 would move nothing at all.)"""
  lr, wd = 0.1, 0.5
  cfg = config.load(ROOT / "configs" / preset, [f"optim.lr={lr}", f"optim.weight_decay={wd}", "optim.warmup_steps=0",
                                                "optim.grad_clip=1e9"])
  params = model.init(cfg.model, cfg.compute, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 1.0, params)  # norm gains, biases and router biases all nonzero
  tx = train.make_optimizer(cfg.optim, cfg.model)
  step = jax.jit(lambda p: jax.tree.map(jnp.add, p, tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]))
  new = _flat(step(params))  # jitted: op by op this takes about a minute on 2 cores
  for name, old in _flat(params).items():
    want = np.asarray(old) * (1 - lr * wd) if name in DECAYED[preset] else np.asarray(old)
    np.testing.assert_allclose(new[name], want, rtol=1e-6, err_msg=name)
