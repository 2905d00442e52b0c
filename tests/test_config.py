"""Config loading: YAML overrides, k=v overrides, and one-line errors naming the key."""

import subprocess
import sys
from pathlib import Path

import hypothesis
import pytest

from r1jax import cli, config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_presets_load():
  for name in ["tiny", "deepseek_v3_671b", "deepseek_v2_lite_16b"]:
    config.load(ROOT / "configs" / f"{name}.yaml")


def test_overrides_apply_and_coerce():
  cfg = config.load(TINY, ["model.n_routed_experts=32", "optim.lr=1", "mesh.expert=2", "compute.remat=full"])
  assert cfg.model.n_routed_experts == 32 and cfg.mesh.expert == 2 and cfg.compute.remat == "full"
  assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override, fragment", [
    ("model.n_experts=4", "model.n_experts=4: unknown key"),
    ("modle.dim=4", "modle={'dim': 4}: unknown key"),
    ("model.dim=abc", "model.dim='abc': must be of type int"),
    ("model.dim=true", "model.dim=True: must be of type int"),
    ("model.score_func=relu", "model.score_func='relu': must be one of"),
    ("model.n_activated_experts=20", "model.n_activated_experts=20: top-k must be in [1, model.n_routed_experts=16]"),
    ("model.n_expert_groups=3", "model.n_expert_groups=3: must divide model.n_routed_experts=16"),
    ("model.n_limited_groups=5", "model.n_limited_groups=5: top-k groups must be in [1, model.n_expert_groups=4]"),
    ("model.n_activated_experts=9", "model.n_activated_experts=9: exceeds the 8 experts"),
    ("model.n_dense_layers=4", "model.n_dense_layers=4: must be <= model.n_layers=3"),
    ("model.qk_rope_head_dim=15", "model.qk_rope_head_dim=15: must be even"),
    ("mesh.data=0", "mesh.data=0: must be a positive axis size or -1"),
    ("train.seq_len=1000", "train.seq_len=1000: exceeds model.max_seq_len=256"),
    ("model.dim", "expected section.field=value"),
])
def test_bad_overrides_fail_with_one_line(override, fragment):
  with pytest.raises(config.ConfigError) as err:
    config.load(TINY, [override])
  msg = str(err.value)
  assert "\n" not in msg
  assert fragment in msg, msg


def test_bad_yaml_names_file_and_key(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model:\n  n_routed_experts: 16\n  n_activated_expert: 4\n")
  with pytest.raises(config.ConfigError, match=r"bad.yaml: model.n_activated_expert=4: unknown key"):
    config.load(bad)
  bad.write_text("model: [1, 2\n")
  with pytest.raises(config.ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
    config.load(bad)
  with pytest.raises(config.ConfigError, match="does not exist"):
    config.load(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_exits_2(capsys):
  assert cli.main(["info", str(TINY), "model.n_activated_experts=17"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "model.n_activated_experts=17" in err


def test_cli_error_before_jax_compiles():
  """A config error must not need jax at all: the CLI checks before importing the model."""
  code = ("import sys; from r1jax import cli; rc = cli.main(['sft', sys.argv[1], 'model.n_expert_groups=5']);"
          "assert 'jax' not in sys.modules, 'jax imported'; sys.exit(rc)")
  proc = subprocess.run([sys.executable, "-c", code, str(TINY)], capture_output=True, text=True)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "r1jax: config error: model.n_expert_groups=5: must divide model.n_routed_experts=16"]


def test_scientific_notation_is_a_float(tmp_path):
  """PyYAML reads `3e-4` as a string (YAML 1.1 wants `3.0e-4`); every learning rate is written that way."""
  assert config.load(TINY, ["optim.lr=3e-4"]).optim.lr == 3e-4
  f = tmp_path / "lr.yaml"
  f.write_text("optim:\n  lr: 1e-3\n  weight_decay: 1E-2\nmodel:\n  norm_eps: 1e-6\n")
  cfg = config.load(f)
  assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.model.norm_eps) == (1e-3, 1e-2, 1e-6)


@pytest.mark.parametrize("text", ["optim.lr=nan", "optim.lr=inf", "optim.lr=-Infinity", "optim.lr=.nan"])
def test_nan_and_inf_are_refused_by_name(text):
  with pytest.raises(config.ConfigError, match=r"optim.lr=.*must be a finite number, not nan or inf"):
    config.load(TINY, [text])


def test_non_numeric_string_for_a_float_is_named():
  with pytest.raises(config.ConfigError, match=r"optim.lr='fast': must be a number"):
    config.load(TINY, ["optim.lr=fast"])


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(hypothesis.strategies.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False),
                  hypothesis.strategies.sampled_from(["{:e}", "{:E}", "{!r}", "{:.3e}"]))
def test_any_written_float_reads_back(value, fmt):
  text = fmt.format(value)
  assert config.load(TINY, [f"optim.lr={text}"]).optim.lr == float(text)


def test_typed_values_parse_once_from_text_or_yaml(tmp_path):
  """Reward specs, stages and data sources are typed at load, from an override's text or YAML's own forms, and
  the saved form (to_dict, as a checkpoint writes it) loads back to the same config."""
  cfg = config.load(TINY, ["grpo.rewards=accuracy:1.0,format:0.1,overlong", "pipeline.stages=base,r1zero",
                           "data.source=rl-direct:countdown"])
  assert cfg.grpo.rewards == (("accuracy", 1.0), ("format", 0.1), ("overlong", 1.0))
  assert cfg.pipeline.stages == ("base", "r1zero")
  assert config.DataSource.parse(cfg.data.source) == ("rl-direct", "countdown")
  assert config.DataSource.parse("my/data.jsonl") == ("jsonl", "my/data.jsonl")
  yaml_cfg = tmp_path / "typed.yaml"
  yaml_cfg.write_text("grpo:\n  rewards: {accuracy: 1, format: 0.5}\npipeline:\n  stages: [base, r1zero]\n")
  loaded = config.load(yaml_cfg)
  assert loaded.grpo.rewards == (("accuracy", 1.0), ("format", 0.5)) and loaded.pipeline.stages == ("base", "r1zero")
  saved = tmp_path / "saved.yaml"
  saved.write_text(__import__("yaml").safe_dump(config.to_dict(cfg)))
  assert config.load(saved) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("grpo.rewards=accuracy:1,accuracy:2", "appears twice"),
    ("grpo.rewards=accuracy:nan", "finite"),
    ("pipeline.stages=base,,rl", "expected comma-separated names"),
    ("data.source='rl:'", "needs a task name"),
    ("data.eval_source='task:'", "data.eval_source='task:'"),
])
def test_typed_values_fail_in_one_line(override, fragment):
  with pytest.raises(config.ConfigError, match=fragment):
    config.load(TINY, [override])


def test_run_directories_saved_before_the_compute_split_still_load(tmp_path):
  """A config.yaml a run wrote before the split (compute settings in its model section, the reward spec and
  stages as strings) loads as it meant; the same keys in a user's config are one-line errors naming the move."""
  from r1jax import checkpoint

  new = config.load(TINY, ["compute.dtype=float32", "compute.fp8.block=16", "compute.remat=dots"])
  old = config.to_dict(new)
  compute = old.pop("compute")  # the fields that existed then (later ones take their defaults)
  old["model"].update({k: v for k, v in compute.items() if f"model.{k}" in config.MOVED})
  old["grpo"]["rewards"] = "accuracy:1.0,format:0.1"
  old["pipeline"]["stages"] = "base,r1zero,cold_start,rl,rejection,sft,final_rl,distill"
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "config.yaml").write_text(__import__("yaml").safe_dump(old))
  assert checkpoint.load_config(tmp_path) == new
  with pytest.raises(config.ConfigError, match="model.remat='dots': moved to compute.remat"):
    config.load_dict({"model": {"remat": "dots"}}, "user.yaml")
