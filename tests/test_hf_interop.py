"""Hugging Face interop: small random models built by transformers itself are imported and must give the
same float32 logits; exports must round-trip and load back into transformers; bad inputs name the culprit."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from r1jax import cli, config, model, sharding
from r1jax.interop import hf, hf_config
from r1jax.interop.safetensors_io import Checkpoint
from r1jax.nn import layers, rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

B, L = 2, 24  # L > original_max_position_embeddings=16: YaRN / llama3 interpolation is in play
TOL = 1e-4
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
CASES = {
    # V3: q_lora, group-limited sigmoid routing with a selection bias, YaRN as V3 (mscale = mscale_all_dim = 1).
    "v3": ("DeepseekV3", dict(MLA, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                              rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # V3 with q_lora 0, tied embeddings, rotate-half RoPE halves, every layer MoE, mscale != mscale_all_dim.
    "v3_q0_tied_halves": ("DeepseekV3", dict(MLA, q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=2,
                                             first_k_dense_replace=0, norm_topk_prob=False, tie_word_embeddings=True,
                                             rope_interleave=False, routed_scaling_factor=1.5,
                                             rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 1.0})),
    # V2-Lite: no q compression, greedy softmax routing, 2 shared experts, YaRN mscale 0.707.
    "v2_lite": ("DeepseekV2", dict(MLA, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                                   routed_scaling_factor=1.0,
                                   rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V2 with group-limited greedy routing, q_lora and tied embeddings, plain RoPE.
    "v2_grouped_tied": ("DeepseekV2", dict(MLA, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4,
                                           topk_group=2, routed_scaling_factor=2.0, tie_word_embeddings=True)),
    "qwen2_tied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_yarn": ("Qwen2", dict(num_key_value_heads=2, head_dim=16, rope_scaling=YARN)),
    "llama3_mqa": ("Llama", dict(num_key_value_heads=1, head_dim=16, rope_theta=5e5,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}


# The tiny preset balances faster than V3 (gamma 0.01); config.json has no field for that training knob,
# so configs compared after an HF round trip use the default.
KNOB = "compute.bias_update_speed=0.001"

def _hf_model(family: str, kwargs: dict):
  """A random transformers model whose weights (norms, biases and router bias included) are all nontrivial."""
  torch.manual_seed(0)
  common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, initializer_range=0.15, attn_implementation="eager")
  if family.startswith("Deepseek"):
    common["num_key_value_heads"] = 4  # MLA: every head has its own key (transformers' default would be 128)
  cfg = getattr(transformers, f"{family}Config")(**{**common, **kwargs})
  m = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.uniform_(-0.2, 0.2)
    for module in m.modules():
      if hasattr(module, "e_score_correction_bias"):
        module.e_score_correction_bias.uniform_(-0.05, 0.05)
  return m


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(torch.tensor(tokens)).logits.numpy()


_logits = jax.jit(lambda params, tokens, cfg, compute: model.apply(params, tokens, cfg, compute).logits_BxLxV,
                  static_argnums=(2, 3))


class Built:
  def __init__(self, name, tmp):
    family, kwargs = CASES[name]
    self.hf_model = _hf_model(family, kwargs)
    self.dir = tmp / "hf"
    self.hf_model.save_pretrained(self.dir, max_shard_size="64KB")  # several shards plus the index file
    self.tokens = np.random.default_rng(1).integers(0, 96, (B, L))
    self.hf_logits = _hf_logits(self.hf_model, self.tokens)
    self.cfg, self.params = hf.import_hf(self.dir, overrides=["compute.dtype=float32"])
    self.logits = np.asarray(_logits(self.params, self.tokens, self.cfg.model, self.cfg.compute))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = Built(name, tmp_path_factory.mktemp(name))
    return cache[name]

  return get


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(built, name):
  b = built(name)
  assert len(json.loads((b.dir / "model.safetensors.index.json").read_text())["weight_map"]) > 10
  diff = np.abs(b.logits - b.hf_logits).max()
  print(f"{name}: max |logits - transformers| = {diff:.2e} (max |logit| {np.abs(b.hf_logits).max():.2f})")
  assert np.abs(b.hf_logits).max() > 1.0  # weights large enough that a wrong mapping would show
  assert diff <= TOL


def test_import_maps_config(built):
  m = built("v3").cfg.model
  assert (m.n_expert_groups, m.n_limited_groups, m.score_func, m.route_scale) == (4, 2, "sigmoid", 2.5)
  assert (m.rope_scaling, m.rope_factor, m.original_seq_len, m.n_dense_layers, m.n_mtp) == ("yarn", 4.0, 16, 1, 0)
  m = built("v2_lite").cfg.model
  assert (m.q_lora_rank, m.score_func, m.n_expert_groups, m.norm_topk_prob, m.mscale) == (0, "softmax", 1, False, 0.707)
  m = built("llama3_mqa").cfg.model
  assert (m.attention, m.n_kv_heads, m.head_dim, m.qkv_bias, m.rope_scaling) == ("gqa", 1, 16, False, "llama3")
  assert built("qwen2_tied").cfg.model.tie_embeddings and built("qwen2_tied").cfg.model.qkv_bias


@pytest.mark.parametrize("name", ["v3", "v3_q0_tied_halves", "v2_grouped_tied", "qwen2_tied", "llama3_mqa"])
def test_export_round_trips_and_loads_in_transformers(built, name, tmp_path):
  b = built(name)
  hf.export_hf(b.params, b.cfg.model, b.cfg.compute, tmp_path, max_shard_bytes=32 * 1024)
  cfg2, params2 = hf.import_hf(tmp_path, overrides=["compute.dtype=float32"])
  assert cfg2.model == b.cfg.model
  _assert_trees_equal(b.params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  diff = np.abs(_hf_logits(reloaded, b.tokens) - b.logits).max()
  print(f"{name}: export -> transformers max diff {diff:.2e}")
  assert diff <= TOL


def test_bfloat16_export_loads_in_transformers(built, tmp_path):
  b = built("llama3_mqa")
  hf.export_hf(b.params, b.cfg.model, b.cfg.compute, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert np.abs(_hf_logits(reloaded, b.tokens) - b.logits).max() < 0.05  # bf16 weights: ~3 significant digits
  cfg, params = hf.import_hf(tmp_path, overrides=["compute.param_dtype=bfloat16"])
  assert params["embed"].dtype == jax.numpy.bfloat16
  want = np.asarray(b.params["embed"]).astype(params["embed"].dtype)
  np.testing.assert_array_equal(np.asarray(params["embed"]), want)


def test_missing_mtp_is_logged(built, caplog):
  with caplog.at_level(logging.WARNING):
    hf.read_config(built("v3").dir)
  assert "importing without MTP (model.n_mtp=0)" in caplog.text


def test_mtp_layers_round_trip(tmp_path, caplog):
  cfg = config.load(Path(__file__).parent.parent / "configs" / "tiny.yaml", ["compute.dtype=float32", KNOB])
  rng = np.random.default_rng(0)  # random values without compiling model.init; router biases nonzero too
  params = jax.tree.map(lambda p: rng.normal(size=p.value.shape).astype(p.value.dtype),
                        model.abstract(cfg.model, cfg.compute), is_leaf=layers.is_param)
  hf.export_hf(params, cfg.model, cfg.compute, tmp_path)
  names = Checkpoint(tmp_path).keys()
  n = cfg.model.n_layers
  assert {f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.embed_tokens.weight",
          f"model.layers.{n}.shared_head.head.weight",
          f"model.layers.{n}.mlp.experts.15.down_proj.weight"} <= set(names)
  cfg2, params2 = hf.import_hf(tmp_path, overrides=["compute.dtype=float32"])
  assert cfg2.model == cfg.model
  _assert_trees_equal(params, params2)
  with caplog.at_level(logging.WARNING):
    cfg3, params3 = hf.import_hf(tmp_path, overrides=["model.n_mtp=0"])
  assert "not importing MTP layers model.layers.3.*" in caplog.text and "mtp" not in params3


def test_import_places_params_in_their_shardings(built):
  b = built("v3")
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  params = hf.load_params(b.dir, b.cfg.model, b.cfg.compute, mesh)
  want = layers.shardings(model.abstract(b.cfg.model, b.cfg.compute), mesh)
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
  assert params["moe_layers"]["ffn"]["experts"]["w_up"].sharding.spec == sharding.spec("layers", "exp", "embed",
                                                                                         "exp_mlp")
  _assert_trees_equal(b.params, jax.device_get(params))


def test_cli_import_export(built, tmp_path):
  b = built("qwen2_tied")
  assert cli.main(["import-hf", str(b.dir), str(tmp_path / "ckpt"), "mesh.fsdp=2"]) == 0
  assert (tmp_path / "ckpt" / "config.yaml").exists()
  assert cli.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
  ours, theirs = Checkpoint(tmp_path / "hf"), transformers.AutoModelForCausalLM.from_pretrained(b.dir).state_dict()
  assert set(ours.keys()) == set(theirs) - {"lm_head.weight"}  # tied: transformers shares the tensor
  for name in ours.keys():
    np.testing.assert_array_equal(ours.get(name), theirs[name].numpy(), err_msg=name)


# ---- failures name the tensor or field ----

def _rewrite(src, dst, edit_tensors=None, edit_config=None):
  """Copy an HF directory into one safetensors file, editing its tensors and/or its config.json."""
  dst.mkdir()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in ((k, Checkpoint(src).get(k)) for k in Checkpoint(src).keys())}
  if edit_tensors:
    edit_tensors(tensors)
  safetensors_torch.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  raw = json.loads((src / "config.json").read_text())
  if edit_config:
    edit_config(raw)
  (dst / "config.json").write_text(json.dumps(raw))
  return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(built, tmp_path):
  src = built("v3").dir
  gone = "model.layers.1.mlp.experts.3.up_proj.weight"
  d = _rewrite(src, tmp_path / "missing", edit_tensors=lambda t: t.pop(gone))
  with pytest.raises(hf.CheckpointError, match=f"missing tensor {gone}"):
    hf.import_hf(d)
  extra = "model.layers.0.mlp.mystery.weight"
  d = _rewrite(src, tmp_path / "extra", edit_tensors=lambda t: t.update({extra: torch.zeros(3)}))
  with pytest.raises(hf.CheckpointError, match=f"unexpected tensor {extra}"):
    hf.import_hf(d)
  d = _rewrite(src, tmp_path / "shape", edit_config=lambda c: c.update(intermediate_size=40))
  shape_error = r"tensor model.layers.0.mlp.(gate|up|down)_proj.weight: shape \[\d+, \d+\] in the checkpoint"
  with pytest.raises(hf.CheckpointError, match=shape_error):
    hf.import_hf(d)
  d = _rewrite(src, tmp_path / "noscale", edit_tensors=lambda t: t.update(
      {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)}))
  with pytest.raises(hf.CheckpointError, match="model.layers.0.mlp.up_proj.weight is FP8 but has no"):
    hf.import_hf(d)


@pytest.mark.parametrize("case,edit,field", [
    ("v3", {"hidden_act": "gelu"}, "hidden_act"),
    ("v3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ("v3", {"rope_parameters": {**YARN, "attention_factor": 1.3}}, "rope_parameters.attention_factor"),
    ("v3", {"rope_parameters": {**YARN, "truncate": False}}, "rope_parameters.truncate"),
    ("v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("v3", {"attention_bias": True}, "attention_bias"),
    ("v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("v3", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("v3", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    ("v3", {"brand_new_field": 1}, "brand_new_field"),
    ("v2_lite", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("v2_lite", {"topk_method": "noaux_tc"}, "topk_method"),
    ("qwen2_tied", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2_tied", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama3_mqa", {"attention_bias": True}, "attention_bias"),
    ("llama3_mqa", {"architectures": ["MistralForCausalLM"]}, "architectures"),
])
def test_unsupported_config_fields_are_named(built, case, edit, field):
  raw = json.loads((built(case).dir / "config.json").read_text())
  with pytest.raises(config.ConfigError, match=f"config.json field {field}"):
    hf_config.from_hf({**raw, **edit})


def test_cli_reports_config_errors(built, tmp_path, capsys):
  d = tmp_path / "bad"
  shutil.copytree(built("llama3_mqa").dir, d)
  raw = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**raw, "mlp_bias": True}))
  assert cli.main(["import-hf", str(d), str(tmp_path / "out")]) == 2
  assert "mlp_bias" in capsys.readouterr().err


@pytest.mark.parametrize("text,where", [
    ('{\n  "architectures": ["LlamaForCausalLM"],\n  "vocab_size" 96\n}\n',
     ":3:16: invalid JSON (Expecting ':' delimiter)"),
    ('{"vocab_size": 96,}', ":1:19: invalid JSON (Expecting property name enclosed in double quotes)"),
    ('["LlamaForCausalLM"]', ": expected a JSON object of config fields, got an array"),
    ('"LlamaForCausalLM"', ": expected a JSON object of config fields, got a string"),
])
def test_cli_reports_malformed_config_json_in_one_line(tmp_path, capsys, text, where):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "config.json").write_text(text)
  assert cli.main(["import-hf", str(d), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err == f"r1jax: config error: {d / 'config.json'}{where}\n"
  assert not (tmp_path / "out").exists()


# ---- RoPE frequencies and scales against transformers' own functions ----

@pytest.mark.parametrize("theta,rope_scaling", [
    (10000.0, {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),  # V3
    (10000.0, {**YARN, "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707,
               "mscale_all_dim": 0.707}),  # V2-Lite
    (10000.0, {**YARN, "mscale_all_dim": 1.0}),  # mscale absent: cos/sin get mscale(s) instead of a ratio
    (10.0, {**YARN, "original_max_position_embeddings": 32768}),  # correction range clamped and inverted
])
def test_mla_rope_matches_transformers(theta, rope_scaling):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

  hf_cfg = transformers.DeepseekV3Config(**MLA, n_group=4, topk_group=2, vocab_size=96, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         rope_theta=theta,
                                         rope_scaling=dict(rope_scaling), max_position_embeddings=1 << 17)
  inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
  ours = config.ModelConfig(**hf_config.from_hf(hf_cfg.to_dict())[0])
  np.testing.assert_allclose(rope.inv_freq(ours), inv_freq.numpy(), rtol=1e-6)
  assert rope.cos_sin_scale(ours) == pytest.approx(attention_scaling, rel=1e-12)
  want = yarn_apply_mscale(hf_cfg.rope_parameters, (ours.qk_nope_head_dim + ours.qk_rope_head_dim) ** -0.5)
  assert rope.softmax_scale(ours) == pytest.approx(want, rel=1e-12)


def test_llama3_rope_matches_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
         "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": {
             "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
  inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**raw))
  ours = config.ModelConfig(**hf_config.from_hf(raw)[0])
  preset = config.load(Path(__file__).parent.parent / "configs" / "llama3_1_8b.yaml").model
  assert ours == preset  # the real config.json
  np.testing.assert_allclose(rope.inv_freq(ours), inv_freq.numpy(), rtol=1e-6)
  assert rope.cos_sin_scale(ours) == scale == 1.0


# DeepSeek's published config.json files (less auto_map) and a Qwen2.5-1.5B-shaped one map onto the presets.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                    "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}
QWEN2_5_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("raw,preset", [(V3_CONFIG, "deepseek_v3_671b"), (V2_LITE_CONFIG, "deepseek_v2_lite_16b"),
                                        (QWEN2_5_CONFIG, "qwen2_5_1_5b")])
def test_published_configs_map_onto_presets(raw, preset, caplog, monkeypatch):
  # Exactly one capture, whatever earlier CLI tests left on the r1jax logger (cli.common.setup_logging) and
  # the pytest version.
  logger = logging.getLogger("r1jax.interop.hf_config")
  monkeypatch.setattr(logger, "propagate", False)
  monkeypatch.setattr(logger, "handlers", [caplog.handler])
  with caplog.at_level(logging.INFO, logger="r1jax.interop.hf_config"):
    fields, compute, info = hf_config.from_hf(raw)
  path = Path(__file__).parent.parent / "configs" / f"{preset}.yaml"
  want = config.load(path).model
  for name in yaml.safe_load(path.read_text())["model"]:
    if name != "n_mtp":  # read_config checks the tensors
      assert fields[name] == getattr(want, name), name
  assert info.fp8_block == ((128, 128) if raw is V3_CONFIG else None)
  assert info.n_mtp == (1 if raw is V3_CONFIG else 0)
  # aux_loss_alpha: config.json's value (DeepSeek's MoEGate trains with it), not the V3 report's 1e-4.
  note = ("aux_loss_alpha=0.001 from config.json (the V3 report §4.2 trained with 1e-4; override with "
          "compute.aux_loss_alpha=1e-4)")
  assert compute.get("aux_loss_alpha") == raw.get("aux_loss_alpha") == (None if raw is QWEN2_5_CONFIG else 0.001)
  assert [r.getMessage() for r in caplog.records if "aux_loss_alpha" in r.getMessage()] == (
      [note] if raw is V3_CONFIG else [])
  if raw is not QWEN2_5_CONFIG:  # absent from config.json: r1jax's default stays
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="r1jax.interop.hf_config"):
      _, compute, _ = hf_config.from_hf({k: v for k, v in raw.items() if k != "aux_loss_alpha"})
    assert "aux_loss_alpha" not in compute and "aux_loss_alpha" not in caplog.text
    assert config.ComputeConfig(**compute).aux_loss_alpha == config.ComputeConfig().aux_loss_alpha
