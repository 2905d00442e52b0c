"""The SFT pipeline: prompt masking, packing, line-numbered errors, shards, exact resume, global batches,
and packed == unpacked loss and gradients."""

import collections
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from r1jax import cli, config, data, losses, model, sharding, tokenizer, train
from r1jax.batch import SHORT_NAMES, Batch

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
BYTES = tokenizer.ByteTokenizer()


def _cfg(*overrides):
  """tiny.yaml's model with small batches; the data section is pinned here, not read from the preset."""
  base = ["train.batch_size=4", "train.seq_len=32", "data.source=task:copy", "data.task_digits=3",
          "data.task_examples=1000", "data.pack=true", "data.shuffle=true", "data.tokenizer=bytes"]
  return config.load(TINY, [*base, *overrides])


def _write(path, lines):
  path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
  return str(path)


def _records(n, seed=0):
  """Prompt/completion pairs of varied lengths (2..22 tokens each with BOS/EOS), so packing has work."""
  rng = np.random.default_rng(seed)
  word = lambda k: "".join(rng.choice(list("abcdefgh"), k))  # noqa: E731
  return [{"prompt": word(rng.integers(0, 10)), "completion": word(rng.integers(1, 12))} for _ in range(n)]


def _segments(batches):
  """Every example in the batches as (tokens, targets, loss_mask) tuples, read back via segment ids."""
  out = []
  for b in batches:
    for r in range(len(b["tokens"])):
      seg = b["segment_ids"][r] if "segment_ids" in b else b["token_mask"][r]  # unpacked: one example per row
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        out.append(tuple(tuple(b[k][r, idx]) for k in data.EXAMPLE_KEYS))
  return out


def _expected(record):
  """An independent construction: the full id sequence, then shift; loss where the next id is completion."""
  prompt = [BYTES.bos_id, *BYTES.encode(record["prompt"])]
  ids = prompt + [*BYTES.encode(record["completion"]), BYTES.eos_id]
  loss_mask = [int(j + 1 >= len(prompt)) for j in range(len(ids) - 1)]
  return tuple(ids[:-1]), tuple(ids[1:]), tuple(loss_mask)


def test_prompt_masking(tmp_path):
  records = [{"prompt": "Wie viel ist 2+2?", "completion": "vier ✓"},
             {"messages": [{"role": "system", "content": "kurz"}, {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "content": "<think>6</think><answer>6</answer>"}]}]
  path = _write(tmp_path / "sft.jsonl", records)
  ds = data.make_dataset(_cfg(f"data.source={path}", "data.pack=false", "data.shuffle=false"), num_epochs=1)
  (batch,) = list(ds)
  unpacked_keys = set(data.BATCH_KEYS) - {"segment_ids"}  # one example per row: attention needs no segment ids
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {k: (np.int32, (4, 32)) for k in unpacked_keys}
  prompt, completion = tokenizer.chat_prompt(records[1]["messages"])
  for r, record in enumerate([records[0], {"prompt": prompt, "completion": completion}]):
    tokens, targets, loss_mask = _expected(record)
    n = len(tokens)
    np.testing.assert_array_equal(batch["tokens"][r, :n], tokens)
    np.testing.assert_array_equal(batch["targets"][r, :n], targets)
    np.testing.assert_array_equal(batch["loss_mask"][r], np.pad(loss_mask, (0, 32 - n)))
    np.testing.assert_array_equal(batch["token_mask"][r], np.arange(32) < n)
    np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
    learned = batch["targets"][r][batch["loss_mask"][r] == 1]
    assert BYTES.decode(learned[:-1]) == record["completion"] and learned[-1] == BYTES.eos_id
  assert not batch["token_mask"][2:].any() and not batch["loss_mask"][2:].any()  # eval-style padded rows
  # the loss's gradient w.r.t. the logits vanishes exactly at prompt (and padding) positions, not elsewhere
  logits = jax.random.normal(jax.random.key(0), (*batch["tokens"].shape, 300))
  g = jax.grad(lambda x: losses.cross_entropy(x, batch["targets"], batch["loss_mask"])[0])(logits)
  per_position = np.abs(np.asarray(g)).sum(-1)
  assert (per_position[batch["loss_mask"] == 0] == 0).all() and (per_position[batch["loss_mask"] == 1] > 0).all()


def test_cli_reports_a_bad_record_in_one_line(tmp_path, capsys):
  path = _write(tmp_path / "bad.jsonl", [*_records(3), {"prompt": "x"}])
  argv = ["sft", str(TINY), f"data.source={path}", "data.shuffle=false", "train.steps=1", "train.seq_len=31",
          f"train.run_dir={tmp_path}", "mesh.data=8", "train.batch_size=8"]
  assert cli.main(argv) == cli.EXIT["data error"]
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"r1jax: data error: {path}:4: ")


def test_packing_keeps_every_example_intact_once_per_epoch(tmp_path):
  records = _records(60)
  path = _write(tmp_path / "sft.jsonl", records)
  batches = list(data.make_dataset(_cfg(f"data.source={path}", "data.pack=true"), num_epochs=1))
  got = collections.Counter(_segments(batches))
  assert got == collections.Counter(_expected(r) for r in records)
  assert len(batches) < 60 / 4  # fewer rows than one example per row
  for b in batches:
    assert all(v.shape == (4, 32) for v in b.values())
    for r in range(4):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all() and (b["loss_mask"][r, n:] == 0).all()  # padding only at the end
      k = seg[n - 1] if n else 0
      assert list(np.unique(seg[:n])) == list(range(1, k + 1)) and (np.diff(seg[:n]) >= 0).all()
      for s in range(1, k + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      np.testing.assert_array_equal(b["token_mask"][r], seg > 0)


def test_epochs_repeat_with_a_new_shuffle():
  cfg = _cfg("data.source=task:reverse", "data.task_examples=200", "data.task_digits=3", "data.pack=false")
  it = data.make_iterator(cfg)
  rows = _segments([next(it) for _ in range(100)])  # two epochs of 200 examples
  first, second = rows[:200], rows[200:]
  src = data.make_source("task:reverse", cfg.data)
  assert collections.Counter(first) == collections.Counter(_expected(src[i]) for i in range(200))
  assert collections.Counter(second) == collections.Counter(first) and second != first
  tokens, targets, loss_mask = first[0]
  digits = bytes(tokens[1:4]).decode()
  assert bytes(targets[:7]).decode() == digits + "=" + digits[::-1] and loss_mask == (0,) * 4 + (1,) * 4


def test_task_examples_are_deterministic_and_eval_differs():
  cfg = _cfg("data.eval_source=task:copy", "data.task_digits=8")
  train_src, eval_src = data.make_source("task:copy", cfg.data), data.make_source("task:copy", cfg.data, eval=True)
  assert train_src[7] == data.make_source("task:copy", cfg.data)[7]
  assert train_src[7]["prompt"] != eval_src[7]["prompt"]
  assert train_src[7]["prompt"][:-1] == train_src[7]["completion"] and len(train_src[7]["completion"]) == 8


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "a", "completion": "b"', "invalid JSON (Expecting ',' delimiter at column 34)"),
    ('{"prompt": "a"}', "expected keys 'prompt' and 'completion', or 'messages'; got ['prompt']"),
    ('{"prompt": 3, "completion": "b"}', "'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": ""}', "empty completion (nothing to learn)"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('', "empty line; JSONL needs one JSON object per line"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's, got role 'user'"),
    ('{"messages": [{"role": "assistant"}]}', "messages[0] must be an object with string 'role' and 'content'"),
    ('{"prompt": "' + "x" * 30 + '", "completion": "y"}',
     "example is 32 tokens after tokenizing, more than train.seq_len=31"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, reason):
  path = _write(tmp_path / "bad.jsonl", [*_records(4), bad, *_records(2)])
  with pytest.raises(data.DataError) as e:  # every line is checked when the dataset is made, before training
    data.make_dataset(_cfg(f"data.source={path}", "train.seq_len=31"), num_epochs=1)
  assert str(e.value) == f"{path}:5: {reason}"
  bad_first = _write(tmp_path / "first.jsonl", [bad])
  with pytest.raises(data.DataError, match=f"^{bad_first}:1: "):
    data.make_iterator(_cfg(f"data.source={bad_first}", "train.seq_len=31"))


@pytest.mark.parametrize("pack", [True, False])
def test_process_shards_are_disjoint_and_complete(tmp_path, pack):
  records = _records(45, seed=1)
  path = _write(tmp_path / "sft.jsonl", records)
  cfg = _cfg(f"data.source={path}", f"data.pack={pack}", "train.batch_size=6")
  shards = [_segments(data.make_dataset(cfg, process_index=p, process_count=3, num_epochs=1)) for p in range(3)]
  for p, shard in enumerate(shards):
    assert collections.Counter(shard) == collections.Counter(_expected(r) for r in records[p::3])
  assert next(data.make_iterator(cfg, process_index=1, process_count=3))["tokens"].shape == (2, 32)
  assert sum(map(collections.Counter, shards), collections.Counter()) == collections.Counter(
      _segments(data.make_dataset(cfg, num_epochs=1)))


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_identical_batches(tmp_path, pack):
  path = _write(tmp_path / "sft.jsonl", _records(30, seed=2))  # 30 examples: epochs end mid-batch
  cfg = _cfg(f"data.source={path}", f"data.pack={pack}")
  it = data.make_iterator(cfg)
  states, batches = [], []
  for _ in range(20):
    states.append(json.loads(json.dumps(it.get_state())))  # a checkpoint stores it as JSON
    batches.append(next(it))
  for k in range(16):  # an epoch is ~4 packed or 7.5 unpacked batches: some k straddle epoch boundaries
    resumed = data.make_iterator(cfg)
    resumed.set_state(states[k])
    for want in batches[k:k + 3]:
      got = next(resumed)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_assemble_shards_over_batch_axes():
  cfg = _cfg("train.batch_size=8", "data.task_digits=3")
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, expert=2))
  local = next(data.make_iterator(cfg))
  glob = data.assemble(local, mesh)
  for key, x in local.items():
    x = getattr(glob, SHORT_NAMES[key])
    assert x.shape == (8, 32) and x.dtype == np.int32
    assert x.sharding.spec == P(("data", "fsdp", "expert"), None)
    assert {s.data.shape for s in x.addressable_shards} == {(1, 32)}
    np.testing.assert_array_equal(np.asarray(x), local[key])


def test_config_errors_are_one_line():
  with pytest.raises(config.ConfigError, match=r"^train.batch_size=4: must divide by the process count 3$"):
    data.make_iterator(_cfg(), process_count=3)
  with pytest.raises(config.ConfigError, match="^data.eval_source='': set it"):
    data.make_iterator(_cfg(), eval=True)
  with pytest.raises(config.ConfigError, match="^data.source=task:add: unknown digit task"):
    data.make_iterator(_cfg("data.source=task:add"))
  with pytest.raises(data.DataError, match=r"^task:copy#0: example is 34 tokens .* train.seq_len=32$"):
    data.make_iterator(_cfg("data.task_digits=16"))
  with pytest.raises(config.ConfigError, match="^model.vocab_size=200: tokenizer bytes"):
    data.make_iterator(_cfg("model.vocab_size=200"))


def test_eval_reads_once_in_order_and_pads():
  cfg = _cfg("data.eval_source=task:sort", "data.task_examples=10", "data.task_digits=3", "data.pack=false")
  batches = list(data.make_iterator(cfg, eval=True))
  assert len(batches) == 3 and batches[-1]["token_mask"][2:].sum() == 0
  src = data.make_source("task:sort", cfg.data, eval=True)
  assert [bytes(t[1:5]).decode() for t, _, _ in _segments(batches)] == [src[i]["prompt"] for i in range(10)]


def test_packed_loss_and_grads_equal_unpacked(tmp_path):
  # MTP and the balance loss are off: they are segment-aware too (MTP's depth-1 targets stop at a segment's
  # end; the balance loss is per packed sequence) and are tested where they are defined. What packing must
  # not change is the token CE, a mean over the same loss tokens in both layouts, and its gradients.
  path = _write(tmp_path / "sft.jsonl", _records(12, seed=3))
  cfg = _cfg("compute.dtype=float32", "model.n_mtp=0", "compute.aux_loss_alpha=0.0", "model.n_layers=2",
             f"data.source={path}", "data.shuffle=false", "train.batch_size=2")
  packed = next(data.make_iterator(cfg))
  examples = [dict(zip(data.EXAMPLE_KEYS, map(np.asarray, seg))) for seg in _segments([packed])]
  assert max(len(np.unique(s[s > 0])) for s in packed["segment_ids"]) >= 2  # examples share rows
  rows = [data.pad_row(e, cfg.train.seq_len, BYTES.pad_id) for e in examples]
  unpacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # no segment ids: one example per row
  # Empty rows (no real or loss tokens) bring the packed batch to the same shape.
  packed = {k: np.pad(v, ((0, len(rows) - len(v)), (0, 0))) for k, v in packed.items()}
  assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()

  params = model.init(cfg.model, cfg.compute, jax.random.key(0))
  grad_fn = jax.jit(jax.value_and_grad(train.loss_fn, has_aux=True), static_argnums=(2, 3))
  (loss_p, (metrics_p, _)), grads_p = grad_fn(params, Batch.of(packed), cfg.model, cfg.compute)
  (loss_u, (metrics_u, _)), grads_u = grad_fn(params, Batch.of(unpacked), cfg.model, cfg.compute)
  # fp32 with "highest" matmuls: the layouts differ only in summation order over rows and padding (measured:
  # equal loss, grads within 3e-8 of magnitudes up to 0.5), so fp32 rounding bounds: rtol 1e-5, atol 1e-6.
  np.testing.assert_allclose(metrics_p["ce"], metrics_u["ce"], rtol=1e-5)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_p, grads_u)
