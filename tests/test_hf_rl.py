"""R1 on your own model and problems, end to end with no downloads (slow): a tiny random Qwen2 and a tiny
DeepSeek-V3 built by transformers, with a BPE tokenizer trained here and a chat template, go through
`r1jax import-hf` -> `r1jax grpo` on a JSONL of word problems under the math verifier -> `r1jax eval` ->
`r1jax export-hf`, and transformers' logits for the export equal r1jax's for the trained policy."""

import json

import jax
import numpy as np
import pytest

from r1jax import checkpoint, cli, model, sharding, tokenizer
from r1jax.rl import problems

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_problems import save_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-4  # as tests/test_hf_interop.py: float32 on both sides, only the order of float operations differs
FAMILIES = {
    "Qwen2": dict(num_key_value_heads=2),
    "DeepseekV3": dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                       qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=8,
                       num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
                       n_shared_experts=1, routed_scaling_factor=2.5),
}


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
  """Word problems with numeric answers, as chat messages (the tokenizer's template renders them)."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("problems") / "apples.jsonl"
  lines = []
  for i in range(24):
    a, b = (int(x) for x in rng.integers(1, 50, 2))
    lines.append({"id": f"apples-{i}", "answer": a + b, "messages": [
        {"role": "user", "content": f"Tom has {a} apples and buys {b} more. How many apples does he have?"}]})
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_grpo_eval_export_on_a_problems_file(family, problems_file, tmp_path, capsys):
  hf_dir = save_tokenizer(tmp_path / "hf", generation_eos=[2])
  vocab = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
  torch.manual_seed(0)
  hf_cfg = getattr(transformers, f"{family}Config")(
      vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=128, **FAMILIES[family])
  getattr(transformers, f"{family}ForCausalLM")(hf_cfg).save_pretrained(hf_dir)

  ckpt, runs = tmp_path / "ckpt", tmp_path / "runs"
  assert cli.main(["import-hf", str(hf_dir), str(ckpt)]) == 0
  assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
  assert cli.main(["grpo", "configs/tiny.yaml", f"grpo.init={ckpt}", f"data.problems={problems_file}",
                   "data.template=chat", "data.eval_share=0.25", "grpo.rewards=accuracy:1.0", "train.steps=2",
                   "grpo.prompts_per_step=2", "grpo.group_size=4", "sampler.max_new_tokens=8", "train.seq_len=80",
                   "grpo.eval_every=2", "grpo.eval_prompts=4", "checkpoint.every=2", f"train.run_dir={runs}",
                   "train.name=rl", "compute.dtype=float32"]) == 0
  policy = runs / "rl" / "grpo"
  history = [json.loads(line) for line in (policy / "metrics.jsonl").read_text().splitlines()]
  steps = [m for m in history if "loss" in m]
  assert len(steps) == 2 and all(np.isfinite(m["loss"]) for m in steps) and "eval_accuracy" in steps[-1]
  samples = [json.loads(line) for line in (policy / "samples.jsonl").read_text().splitlines()]
  assert samples and samples[0]["prompt"].startswith("<|im_start|>system\nYou are helpful.")
  cfg = checkpoint.load_config(policy)
  assert cfg.data.tokenizer == str(ckpt.absolute() / "tokenizer") and cfg.model.vocab_size == vocab

  capsys.readouterr()
  assert cli.main(["eval", str(policy), "--n", "4"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  held_out = sum(problems.in_eval(f"apples-{i}", 0.25) for i in range(24))  # the file's eval split
  assert result["task"] == "apples.jsonl" and result["n"] == min(4, held_out) and 0.0 <= result["accuracy"] <= 1.0

  out = tmp_path / "export"
  assert cli.main(["export-hf", str(policy), str(out)]) == 0
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert transformers.AutoTokenizer.from_pretrained(out).chat_template  # the tokenizer went with the model
  # (that load picks the tokenizer class from config.json's model type, which re-splits this test's own BPE
  # differently; the tokenizer directory alone is what transformers and r1jax both read as tokenizer.json)
  hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt / "tokenizer")
  tok = tokenizer.load(cfg.data.tokenizer)
  messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more."}]
  ids = np.asarray([tokenizer.prompt_ids(tok, tokenizer.render_chat(tok, messages))])
  expected = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  assert ids[0].tolist() == list(getattr(expected, "input_ids", expected))
  with torch.no_grad():
    theirs = hf_model(torch.tensor(ids)).logits.numpy()
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    params = checkpoint.load_params(policy, cfg, mesh)
    rows = np.repeat(ids, sharding.batch_size_multiple(mesh), axis=0)  # the batch is split over the devices
    ours = np.asarray(model.apply(params, rows, cfg.model, cfg.compute).logits_BxLxV)[:1]
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=TOL)
  initial = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  with torch.no_grad():
    assert not np.allclose(initial(torch.tensor(ids)).logits.numpy(), theirs)  # GRPO changed the weights
