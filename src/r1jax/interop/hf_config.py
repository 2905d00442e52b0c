"""Hugging Face config.json <-> ModelConfig for DeepseekV3ForCausalLM, DeepseekV2ForCausalLM, Qwen2ForCausalLM
and LlamaForCausalLM (semantics of transformers' modeling code and DeepSeek's reference code).

Every field of config.json is mapped to a ModelConfig field, checked to hold the one value r1jax implements,
or listed as metadata that changes no math; anything else is an error that names the field."""

from __future__ import annotations

import dataclasses
import logging

from r1jax.config import ComputeConfig, ConfigError, ModelConfig

log = logging.getLogger(__name__)

V3, V2, QWEN2, LLAMA = "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"
ARCHS = (V3, V2, QWEN2, LLAMA)
_MODEL_TYPES = {V3: "deepseek_v3", V2: "deepseek_v2", QWEN2: "qwen2", LLAMA: "llama"}
MLA_ARCHS, GQA_ARCHS = (V3, V2), (QWEN2, LLAMA)

# Fields that change no math: ids, bookkeeping, inference-time switches, parallelism layout.
_METADATA = {
    "architectures", "model_type", "_name_or_path", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "output_router_logits",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "id2label", "label2id",
    "pretraining_tp",  # splits the same matmuls into slices (transformers v4)
    "ep_size",  # DeepSeek's expert-parallel degree at training time
    "_attn_implementation", "_experts_implementation",
    # Generic PretrainedConfig attributes that configs saved by transformers carry along.
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "problem_type", "finetuning_task", "prefix",
    "task_specific_params", "tie_encoder_decoder", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "add_cross_attention",
    "output_scores", "return_dict_in_generate", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}
# Rope dict keys r1jax reads; others are errors.
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor", "truncate",
              "attention_factor", "partial_rotary_factor"}


@dataclasses.dataclass(frozen=True)
class HFInfo:
  """What the checkpoint's layout needs beyond ModelConfig."""

  arch: str
  rope_interleave: bool = True  # MLA rope dims stored as interleaved pairs (False: rotate-half halves)
  fp8_block: tuple[int, int] | None = None  # weight_scale_inv block of FP8 checkpoints
  n_mtp: int = 0  # MTP modules declared by config.json (layers num_hidden_layers ...)


def _error(key: str, value, reason: str):
  raise ConfigError(f"config.json field {key}={value!r}: {reason}")


class _Fields:
  """Reads config.json fields and remembers which were looked at, so unknown ones can be reported."""

  def __init__(self, raw: dict, defaults: dict):
    self.raw, self.defaults, self.used = raw, defaults, set()

  def get(self, key: str):
    self.used.add(key)
    if key in self.raw:
      return self.raw[key]
    if key in self.defaults:
      return self.defaults[key]
    raise ConfigError(f"config.json: missing field {key}")

  def expect(self, key: str, allowed: tuple, reason: str):
    value = self.get(key)
    if value not in allowed:
      _error(key, value, reason)
    return value

  def finish(self):
    unknown = sorted(set(self.raw) - self.used - _METADATA)
    if unknown:
      _error(unknown[0], self.raw[unknown[0]], "unknown field; r1jax cannot tell whether it changes the math"
             + (f" (also unknown: {unknown[1:]})" if len(unknown) > 1 else ""))


def architecture(raw: dict) -> str:
  archs = raw.get("architectures") or []
  by_type = {v: k for k, v in _MODEL_TYPES.items()}
  if len(archs) == 1 and archs[0] in ARCHS:
    return archs[0]
  if not archs and raw.get("model_type") in by_type:
    return by_type[raw["model_type"]]
  _error("architectures", archs, f"supported: {list(ARCHS)}")


def _rope(f: _Fields, arch: str) -> dict:
  """RoPE fields, from transformers v5 `rope_parameters` or the published `rope_theta` + `rope_scaling`."""
  f.used.update({"rope_parameters", "rope_scaling", "rope_theta"})
  key = "rope_scaling" if f.raw.get("rope_scaling") else "rope_parameters"  # transformers' precedence
  rope = dict(f.raw.get(key) or {})
  for name in sorted(set(rope) - _ROPE_KEYS):
    _error(f"{key}.{name}", rope[name], "unknown RoPE parameter")
  kind = rope.get("rope_type") or rope.get("type") or "default"
  if rope.get("type") and rope.get("rope_type") and rope["type"] != rope["rope_type"]:
    _error(f"{key}.type", rope["type"], f"disagrees with rope_type={rope['rope_type']!r}")
  partial = rope.get("partial_rotary_factor", f.raw.get("partial_rotary_factor", 1.0))
  f.used.add("partial_rotary_factor")
  if partial not in (None, 1, 1.0):
    _error("partial_rotary_factor", partial, "r1jax rotates the whole RoPE width")
  if rope.get("truncate", True) is not True:
    _error(f"{key}.truncate", rope["truncate"], "r1jax's YaRN always rounds the correction range (truncate=true)")
  if rope.get("attention_factor") is not None:
    _error(f"{key}.attention_factor", rope["attention_factor"], "r1jax derives YaRN's attention factor from "
           "factor/mscale/mscale_all_dim; an explicit one is not supported")
  out = {"rope_theta": float(rope.get("rope_theta", f.raw.get("rope_theta", 10000.0)))}
  max_pos = f.get("max_position_embeddings")
  original = rope.get("original_max_position_embeddings") or max_pos
  if kind == "default":
    return {**out, "rope_scaling": "none"}
  if kind == "yarn":
    factor = rope.get("factor") or max_pos / original
    return {**out, "rope_scaling": "yarn", "rope_factor": float(factor), "original_seq_len": int(original),
            "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
            # Absent means "not given" in HF's formulas, which r1jax spells 0.0 (rope.cos_sin_scale).
            "mscale": float(rope.get("mscale") or 0.0), "mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0)}
  if kind == "llama3" and arch in GQA_ARCHS:
    return {**out, "rope_scaling": "llama3", "rope_factor": float(rope["factor"]), "original_seq_len": int(original),
            "low_freq_factor": float(rope["low_freq_factor"]), "high_freq_factor": float(rope["high_freq_factor"])}
  _error(f"{key}.rope_type", kind, f"{arch} RoPE scaling supported by r1jax: default, yarn"
         + (", llama3" if arch in GQA_ARCHS else ""))


def _common(f: _Fields) -> dict:
  f.expect("hidden_act", ("silu",), "r1jax's MLPs are SwiGLU (silu)")
  if f.raw.get("pruned_heads"):
    _error("pruned_heads", f.raw["pruned_heads"], "r1jax has no pruned attention heads")
  f.used.add("pruned_heads")
  dropout = f.get("attention_dropout")
  if dropout:
    _error("attention_dropout", dropout, "r1jax has no dropout")
  return {"vocab_size": f.get("vocab_size"), "dim": f.get("hidden_size"), "inter_dim": f.get("intermediate_size"),
          "n_layers": f.get("num_hidden_layers"), "n_heads": f.get("num_attention_heads"),
          "norm_eps": float(f.get("rms_norm_eps")), "tie_embeddings": bool(f.get("tie_word_embeddings")),
          "max_seq_len": f.get("max_position_embeddings")}


def _mla(f: _Fields, arch: str) -> tuple[dict, dict]:
  heads = f.get("num_attention_heads")
  kv_heads = f.get("num_key_value_heads")
  if kv_heads not in (None, heads):
    _error("num_key_value_heads", kv_heads, f"MLA expands keys for all num_attention_heads={heads} heads")
  f.expect("attention_bias", (False,), "r1jax's MLA projections have no biases")
  nope, rope_dim = f.get("qk_nope_head_dim"), f.get("qk_rope_head_dim")
  for derived, value in [("qk_head_dim", nope + rope_dim), ("head_dim", rope_dim)]:
    if derived in f.raw and f.get(derived) not in (None, value):
      _error(derived, f.raw[derived], f"must equal {value} for MLA (derived by transformers)")
  f.expect("moe_layer_freq", (1,), "r1jax makes every layer after first_k_dense_replace an MoE layer")
  f.expect("seq_aux", (True,), "r1jax's balance loss is sequence-wise (V3 report eq. 17-20)")
  fields = {"attention": "mla", "q_lora_rank": f.get("q_lora_rank") or 0, "kv_lora_rank": f.get("kv_lora_rank"),
            "qk_nope_head_dim": nope, "qk_rope_head_dim": rope_dim, "v_head_dim": f.get("v_head_dim"),
            "n_dense_layers": f.get("first_k_dense_replace"), "n_routed_experts": f.get("n_routed_experts"),
            "n_shared_experts": f.get("n_shared_experts"), "n_activated_experts": f.get("num_experts_per_tok"),
            "moe_inter_dim": f.get("moe_intermediate_size"), "route_scale": float(f.get("routed_scaling_factor")),
            "n_mtp": 0}  # hf.read_config enables the declared MTP layers when the checkpoint has them
  if arch == V3:
    f.expect("scoring_func", ("sigmoid",), "transformers' DeepseekV3 always scores experts with a sigmoid")
    f.expect("topk_method", ("noaux_tc",), "DeepseekV3 routes with noaux_tc (bias-corrected, group-limited)")
    groups, top_groups = f.get("n_group"), f.get("topk_group")
    fields.update(score_func="sigmoid", norm_topk_prob=bool(f.get("norm_topk_prob")),
                  n_expert_groups=groups, n_limited_groups=top_groups)
    mtp_key = "num_mtp_layers" if "num_mtp_layers" in f.raw else "num_nextn_predict_layers"
    info = {"rope_interleave": bool(f.get("rope_interleave")), "n_mtp": f.get(mtp_key) or 0}
  else:
    f.expect("scoring_func", ("softmax",), "transformers' DeepseekV2 always scores experts with a softmax")
    f.expect("mlp_bias", (False,), "r1jax's MLPs have no biases")
    f.expect("norm_topk_prob", (False,), "transformers' DeepseekV2 ignores it while DeepSeek's reference code "
             "applies it, so its meaning is ambiguous")
    method = f.expect("topk_method", ("greedy", "group_limited_greedy"), "DeepseekV2 routing is greedy or "
                      "group_limited_greedy")
    groups = (f.get("n_group"), f.get("topk_group")) if method == "group_limited_greedy" else (1, 1)
    if None in groups:
      _error("n_group", groups[0], "group_limited_greedy needs n_group and topk_group")
    fields.update(score_func="softmax", norm_topk_prob=False, n_expert_groups=groups[0], n_limited_groups=groups[1])
    f.used.update({"n_group", "topk_group"})  # greedy routing ignores them, as transformers does
    info = {"n_mtp": 0}
  return fields, info


def _gqa(f: _Fields, arch: str) -> dict:
  heads, dim = f.get("num_attention_heads"), f.get("hidden_size")
  head_dim = f.get("head_dim") or dim // heads
  fields = {"attention": "gqa", "n_kv_heads": f.get("num_key_value_heads") or heads, "head_dim": head_dim,
            "n_dense_layers": f.get("num_hidden_layers"), "n_mtp": 0}
  if arch == QWEN2:
    f.expect("use_sliding_window", (False,), "r1jax has no sliding-window attention")
    f.expect("use_mrope", (False,), "r1jax has no multimodal RoPE")
    f.used.update({"sliding_window", "max_window_layers"})  # unused without use_sliding_window
    layer_types = f.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
      _error("layer_types", layer_types, "r1jax has full attention in every layer")
    fields["qkv_bias"] = True  # transformers' Qwen2 always has q/k/v biases (and none on o_proj)
  else:
    f.expect("attention_bias", (False,), "Llama's attention_bias also adds an o_proj bias, which r1jax lacks")
    f.expect("mlp_bias", (False,), "r1jax's MLPs have no biases")
    fields["qkv_bias"] = False
  return fields


_DEFAULTS = {  # transformers' defaults for fields that published configs sometimes omit
    V3: {"rope_interleave": True, "num_nextn_predict_layers": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
         "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "first_k_dense_replace": 3, "q_lora_rank": 1536},
    V2: {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "first_k_dense_replace": 0,
         "q_lora_rank": 1536, "n_group": None, "topk_group": None, "mlp_bias": False, "routed_scaling_factor": 1.0},
    QWEN2: {"use_sliding_window": False, "use_mrope": False, "layer_types": None, "head_dim": None},
    LLAMA: {"mlp_bias": False, "head_dim": None},
}
_SHARED_DEFAULTS = {"initializer_range": 0.02, "tie_word_embeddings": False, "attention_bias": False,
                    "attention_dropout": 0.0, "num_key_value_heads": None, "hidden_act": "silu", "moe_layer_freq": 1,
                    "seq_aux": True}


def from_hf(raw: dict, *, quiet: bool = False) -> tuple[dict, dict, HFInfo]:
  """(ModelConfig field values, ComputeConfig field values, layout info) from a parsed config.json; raises
  ConfigError naming a field. The compute fields are how the published model was trained: initializer_range,
  and the MoE balance loss weight.

  `quiet` skips INFO notes on the mapping, for callers that only need the layout (hf.load_params).
  """
  arch = architecture(raw)
  f = _Fields(raw, {**_SHARED_DEFAULTS, **_DEFAULTS[arch]})
  fields = {**_common(f), **_rope(f, arch)}
  compute = {"init_std": float(f.get("initializer_range"))}
  # Kept as published: DeepSeek's MoEGate trains with it as the seq_aux alpha (V2-Lite's 0.001 is the V2
  # paper's expert-level alpha_1); absent, r1jax's default (V3 report §4.2) stays.
  if arch in MLA_ARCHS and "aux_loss_alpha" in raw:
    compute["aux_loss_alpha"] = float(f.get("aux_loss_alpha"))
  info = {}
  if arch in MLA_ARCHS:
    attn, info = _mla(f, arch)
    fields.update(attn)
  else:
    fields.update(_gqa(f, arch))
  for key in ("num_nextn_predict_layers", "num_mtp_layers"):
    if arch != V3 and key in raw:
      f.expect(key, (0, None), f"{arch} has no MTP modules")
  quant = f.raw.get("quantization_config")
  f.used.add("quantization_config")
  if quant is not None:
    info["fp8_block"] = _fp8_block(quant)
  f.finish()
  try:  # shapes must make sense before any tensor is read
    ModelConfig(**{**fields, "n_mtp": 0}).validate("model")
  except ConfigError as e:
    raise ConfigError(f"config.json maps to an invalid r1jax config: {e}") from None
  if arch == V3 and "aux_loss_alpha" in raw and not quiet:
    log.info("aux_loss_alpha=%g from config.json (the V3 report §4.2 trained with 1e-4; override with "
             "compute.aux_loss_alpha=1e-4)", compute["aux_loss_alpha"])
  return fields, compute, HFInfo(arch=arch, **info)


def _fp8_block(quant: dict) -> tuple[int, int]:
  """DeepSeek's FP8 release: e4m3 weights with one float32 weight_scale_inv per 128x128 block."""
  method, fmt = quant.get("quant_method"), quant.get("fmt", "e4m3")
  if method != "fp8" or fmt != "e4m3":
    _error("quantization_config", quant, "only block-scaled fp8 (e4m3, weight_scale_inv) checkpoints are supported")
  block = quant.get("weight_block_size")
  if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
    _error("quantization_config.weight_block_size", block, "must be two positive block sizes [out, in]")
  return tuple(block)


def default_arch(cfg: ModelConfig) -> str:
  if cfg.attention == "gqa":
    return QWEN2 if cfg.qkv_bias else LLAMA
  return V3 if cfg.score_func == "sigmoid" else V2


def _rope_to_hf(cfg: ModelConfig, arch: str) -> dict | None:
  if cfg.rope_scaling == "none":
    return None
  if cfg.rope_scaling == "llama3":
    if arch in MLA_ARCHS:
      raise ConfigError(f"model.rope_scaling=llama3: {arch} cannot express Llama 3.1 RoPE scaling")
    return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.low_freq_factor,
            "high_freq_factor": cfg.high_freq_factor, "original_max_position_embeddings": cfg.original_seq_len}
  rope = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.beta_fast,
          "beta_slow": cfg.beta_slow, "original_max_position_embeddings": cfg.original_seq_len}
  rope.update({k: getattr(cfg, k) for k in ("mscale", "mscale_all_dim") if getattr(cfg, k)})
  return rope


def to_hf(cfg: ModelConfig, compute: ComputeConfig, arch: str, dtype: str) -> dict:
  """config.json for `arch` in the published (transformers v4) style that v5 also reads."""
  def need(ok: bool, key: str, reason: str):
    if not ok:
      raise ConfigError(f"model.{key}={getattr(cfg, key)!r}: {arch} cannot express it ({reason})")

  if arch not in ARCHS:
    raise ConfigError(f"architecture {arch!r}: supported: {list(ARCHS)}")
  out = {"architectures": [arch], "model_type": _MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
         "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
         "rope_theta": cfg.rope_theta, "rope_scaling": _rope_to_hf(cfg, arch), "attention_dropout": 0.0,
         "initializer_range": compute.init_std, "torch_dtype": dtype, "use_cache": True}
  if arch in GQA_ARCHS:
    need(cfg.attention == "gqa", "attention", "dense students use grouped-query attention")
    need(cfg.n_dense_layers == cfg.n_layers, "n_dense_layers", "no MoE layers")
    need(cfg.n_mtp == 0, "n_mtp", "no MTP modules")
    need(cfg.qkv_bias == (arch == QWEN2), "qkv_bias", "Qwen2 always has q/k/v biases, Llama never")
    out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    out.update({"use_sliding_window": False} if arch == QWEN2 else {"attention_bias": False, "mlp_bias": False})
    return out
  need(cfg.attention == "mla", "attention", "DeepSeek models use MLA")
  out.update(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
             qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
             v_head_dim=cfg.v_head_dim, first_k_dense_replace=cfg.n_dense_layers, moe_layer_freq=1,
             n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
             num_experts_per_tok=cfg.n_activated_experts, moe_intermediate_size=cfg.moe_inter_dim,
             routed_scaling_factor=cfg.route_scale, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
             norm_topk_prob=cfg.norm_topk_prob, attention_bias=False, aux_loss_alpha=compute.aux_loss_alpha,
             seq_aux=True)
  if arch == V3:
    need(cfg.score_func == "sigmoid", "score_func", "DeepseekV3 scores experts with a sigmoid")
    need(cfg.has_router_bias, "router_bias", "DeepseekV3's gate always has an e_score_correction_bias")
    out.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True,
               num_nextn_predict_layers=cfg.n_mtp)
  else:
    need(cfg.score_func == "softmax", "score_func", "DeepseekV2 scores experts with a softmax")
    need(not cfg.norm_topk_prob, "norm_topk_prob", "transformers' DeepseekV2 ignores it")
    need(cfg.n_mtp == 0, "n_mtp", "DeepseekV2 has no MTP modules")
    grouped = cfg.n_expert_groups > 1
    out.update(scoring_func="softmax", topk_method="group_limited_greedy" if grouped else "greedy", mlp_bias=False)
  return out
