"""The RULES table, mesh validation and the `info --mesh` memory/traffic report, on 8 simulated devices."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from r1jax import cli, config, model, sharding, train
from r1jax.config import ConfigError, MeshConfig
from r1jax.nn import layers

ROOT = Path(__file__).resolve().parent.parent
V3 = str(ROOT / "configs/deepseek_v3_671b.yaml")
TINY = str(ROOT / "configs/tiny.yaml")
FSDP_EXPERT = ("fsdp", "context", "expert")  # weights are FSDP-sharded over context too (long-context meshes)
FSDP = ("fsdp", "context")  # expert weights: `expert` is taken by the experts dim

# DeepSeek-V3 671B: where each kind of weight lives (the leading None is the stacked-layers axis).
GOLDEN_671B = {
    "embed": P("tensor", FSDP_EXPERT),
    "head": P(FSDP_EXPERT, "tensor"),
    "final_norm": P(None),
    "dense_layers/ffn/w_gate": P(None, FSDP_EXPERT, "tensor"),
    "dense_layers/ffn/w_down": P(None, "tensor", FSDP_EXPERT),
    "moe_layers/attn/wq_a": P(None, FSDP_EXPERT, None),
    "moe_layers/attn/wq_b": P(None, ("fsdp", "expert"), "tensor"),  # the latent ranks skip context
    "moe_layers/attn/wkv_b": P(None, ("fsdp", "expert"), "tensor"),
    "moe_layers/attn/wo": P(None, "tensor", FSDP_EXPERT),
    "moe_layers/ffn/router/w": P(None, FSDP_EXPERT, None),
    "moe_layers/ffn/router/bias": P(None, None),
    "moe_layers/ffn/shared/w_up": P(None, FSDP_EXPERT, "tensor"),
    "moe_layers/ffn/experts/w_gate": P(None, "expert", FSDP, "tensor"),
    "moe_layers/ffn/experts/w_up": P(None, "expert", FSDP, "tensor"),
    "moe_layers/ffn/experts/w_down": P(None, "expert", "tensor", FSDP),
    "mtp/block/ffn/experts/w_gate": P(None, "expert", FSDP, "tensor"),
    "mtp/proj": P(None, None, FSDP_EXPERT),
}


def _by_path(tree, is_leaf=None):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def test_spec_maps_logical_names_and_skips_taken_axes():
  assert sharding.spec("batch", "seq", "act_embed") == P(("data", "fsdp", "expert"), "context", None)
  assert sharding.spec("exp", "embed", "exp_mlp") == P("expert", FSDP, "tensor")  # expert taken by `exp`
  assert sharding.spec("embed", "q_lora") == P(FSDP_EXPERT, None)
  assert sharding.spec("q_lora", "heads") == P(("fsdp", "expert"), "tensor")
  with pytest.raises(KeyError, match="not in sharding.RULES"):
    sharding.spec("nonsense")


def test_671b_params_get_the_intended_specs_abstractly():
  cfg = config.load(V3)
  mesh = sharding.abstract_mesh({"data": 1, "fsdp": 8, "expert": 32, "tensor": 1})
  boxed = _by_path(model.abstract(cfg.model, cfg.compute), layers.is_param)  # ShapeDtypeStructs: nothing allocated
  shardings = _by_path(model.param_shardings(cfg.model, cfg.compute, mesh))
  for name, want in GOLDEN_671B.items():
    assert shardings[name].spec == want, name
  w = boxed["moe_layers/ffn/experts/w_gate"].value
  assert shardings["moe_layers/ffn/experts/w_gate"].shard_shape(w.shape) == (58, 256 // 32, 7168 // 8, 2048)
  assert all(shardings[n].spec == P(None, None) for n in boxed if n.endswith("norm") and n.startswith("moe"))


def test_bad_meshes_fail_with_one_line(tiny, capsys):
  with pytest.raises(ConfigError,
                     match=r"^mesh data=3, fsdp=1, expert=1, context=1, tensor=1: the axis product 3 != 8 devices$"):
    sharding.make_mesh(MeshConfig(data=3))
  with pytest.raises(ConfigError, match="the other axes .3 devices. do not divide 8 devices"):
    sharding.make_mesh(MeshConfig(data=-1, expert=3))
  run = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, n_routed_experts=12))
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=8))
  with pytest.raises(ConfigError, match=r"^mesh.expert=8: the expert axis must divide model.n_routed_experts=12$"):
    train.init_state(run, jax.random.key(0), mesh)  # before anything is compiled
  assert cli.main(["info", TINY, "--mesh", "data=2,expert=3"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "expert axis must divide model.n_routed_experts=16" in err


@pytest.mark.parametrize("field,value", [("n_heads", 6), ("vocab_size", 510), ("inter_dim", 250)])
def test_tensor_axis_must_divide_heads_vocab_and_mlp_width(tiny, field, value):
  cfg = dataclasses.replace(tiny.model, **{field: value})
  mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
  with pytest.raises(ConfigError, match=rf"^mesh.tensor=4: the tensor axis must divide model.{field}={value}$"):
    sharding.validate_mesh(cfg, tiny.compute, mesh)
  sharding.validate_mesh(tiny.model, tiny.compute, mesh)  # 4 heads, vocab 512, inter_dim 256 all split 4 ways


def test_tensor_axis_must_divide_kv_heads_of_gqa():
  run = config.load(ROOT / "configs/tiny_dense_student.yaml")  # 4 query heads, 2 kv heads
  with pytest.raises(ConfigError, match=r"^mesh.tensor=4: the tensor axis must divide model.n_kv_heads=2$"):
    sharding.validate_mesh(run.model, run.compute, sharding.make_mesh(MeshConfig(data=2, tensor=4)))
  sharding.validate_mesh(run.model, run.compute, sharding.make_mesh(MeshConfig(data=4, tensor=2)))


def test_memory_report_equals_the_real_per_device_bytes(tiny, capsys):
  """The report's params/optimizer bytes equal device 0's shards of a real TrainState on that mesh."""
  sizes = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
  assert cli.main(["info", TINY, "--mesh", ",".join(f"{k}={v}" for k, v in sizes.items()), "--batch", "8",
                   "--json"]) == 0
  r = json.loads(capsys.readouterr().out)["mesh"]
  mesh = sharding.make_mesh(MeshConfig(**sizes))
  with jax.set_mesh(mesh):
    state = train.init_state(config.load(TINY), jax.random.key(0), mesh)
  dev0 = jax.devices()[0]
  on_dev0 = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)  # noqa: E731
                             for s in x.addressable_shards if s.device == dev0)
  assert r["bytes_per_device"]["params"] == on_dev0(state.params)
  assert r["bytes_per_device"]["optimizer"] == on_dev0(state.opt_state)
  # All-to-all: 4 exchanges (dispatch, combine and their transposes) of the [E, C, D] bf16 buffer, of
  # which 1/2 leaves the device on an expert axis of 2; tokens per device 8*32/4, dropless C = tokens.
  cfg, a = config.load(TINY).model, r["all_to_all"]
  tokens = 8 * 32 // 4
  assert a["tokens_per_device"] == a["capacity"] == tokens
  assert a["bytes_per_layer"] == 4 * cfg.n_routed_experts * tokens * cfg.dim * 2 // 2
  assert a["moe_layers"] == cfg.n_moe_layers + cfg.n_mtp
  assert math.isclose(a["ms_per_layer"], 1e3 * a["bytes_per_layer"] / 400e9)


def test_memory_report_counts_the_fp8_expert_tiles():
  """With FP8 experts quantised once per step, the report adds their e4m3 tiles: device 0's bytes of the tiles
  that moe.with_expert_tiles computes from the stacked experts on that mesh (GSPMD keeps them split like the
  weights); none without FP8."""
  from r1jax import memory
  from r1jax.nn import moe

  sizes = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
  cfg = config.load(TINY, ["compute.fp8.enabled=true", "compute.fp8.block=16"])
  assert memory.expert_tile_bytes(config.load(TINY), sizes) == 0
  mesh = sharding.make_mesh(MeshConfig(**sizes))
  with jax.set_mesh(mesh):
    params = model.init(cfg.model, cfg.compute, jax.random.key(0), mesh)
    tiles = jax.jit(lambda p: moe.with_expert_tiles(p, cfg.compute)["experts"]["fp8_tiles"])(params["moe_layers"]["ffn"])
  dev0 = jax.devices()[0]
  on_dev0 = sum(s.data.nbytes for x in jax.tree.leaves(tiles) for s in x.addressable_shards if s.device == dev0)
  assert memory.expert_tile_bytes(cfg, sizes) == on_dev0 > 0


def test_lower_reports_xla_memory_when_the_devices_exist(capsys):
  assert cli.main(["info", TINY, "--mesh", "data=2,expert=4", "--lower", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)["mesh"]
  stats, mem = r["lower"]["memory_analysis"], r["bytes_per_device"]
  batch_bytes = 3 * 16 * 32 * 4 // 8  # tokens, targets, loss_mask: int32, split 8 ways
  # + the step and the two non-finite counters (int32) and the rng key (2 x uint32)
  assert stats["argument_size_in_bytes"] == mem["params"] + mem["optimizer"] + batch_bytes + 3 * 4 + 8
  assert stats["alias_size_in_bytes"] >= mem["params"] + mem["optimizer"]  # the state is donated


def test_lower_671b_on_an_abstract_mesh(capsys):
  """256 devices are not here: the step still lowers from ShapeDtypeStructs, and says why it cannot compile."""
  assert cli.main(["info", V3, "compute.capacity_factor=1.25", "--mesh", "data=1,fsdp=8,expert=32", "--batch", "256",
                   "--link-gbps", "400", "--lower", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)["mesh"]
  assert r["lower"]["lowered"] and r["lower"]["memory_analysis"] is None
  assert "xla_force_host_platform_device_count=256" in r["lower"]["note"]
  a = r["all_to_all"]
  assert a["capacity"] == math.ceil(1.25 * 4096 * 8 / 256) == 160
  assert np.isclose(a["bytes_per_layer"], 6 * 256 * 160 * 7168 * 2 * 31 / 32)  # 6 exchanges under remat
  assert 9e9 < r["bytes_per_device"]["params"] < 11e9  # 671B fp32 over 256 devices


def test_memory_report_with_a_context_axis(capsys):
  """Per-device state bytes equal device 0's real shards on a mesh with context=2; the context all-gather moves
  each layer's latent (kv_lora_rank + qk_rope_head_dim per token) from the other half of every row, three times
  a step under remat (forward, its recomputation, the backward's reduce-scatter)."""
  sizes = {"data": 1, "fsdp": 1, "expert": 2, "context": 2, "tensor": 2}
  assert cli.main(["info", TINY, "--mesh", ",".join(f"{k}={v}" for k, v in sizes.items()), "--batch", "4",
                   "--seq", "64", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)["mesh"]
  mesh = sharding.make_mesh(MeshConfig(**sizes))
  with jax.set_mesh(mesh):
    state = train.init_state(config.load(TINY), jax.random.key(0), mesh)
  dev0 = jax.devices()[0]
  assert r["bytes_per_device"]["params"] == sum(s.data.nbytes for x in jax.tree.leaves(state.params)
                                                for s in x.addressable_shards if s.device == dev0)
  cfg, c = config.load(TINY).model, r["context_exchange"]
  rows = 4 / 2  # batch over expert (data and fsdp are 1)
  assert c["bytes_per_exchange"] == int(rows * 64 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 / 2)
  n_ops = 2 if config.load(TINY).compute.remat == "none" else 3
  assert c["exchanges_per_layer"] == n_ops
  assert c["bytes_per_step"] == int(n_ops * c["bytes_per_exchange"] * (cfg.n_layers + cfg.n_mtp))
  assert r["all_to_all"]["tokens_per_device"] == 4 * 64 // 2 // 2  # rows over expert, each row over context
  assert cli.main(["info", TINY, "--mesh", "data=2,context=4", "--seq", "30"]) == cli.EXIT["config error"]
  assert "must be a multiple of mesh.context=4" in capsys.readouterr().err


def test_v3_at_128k_with_context_4_lowers(capsys):
  """The issue's plan for V3 at 128K: 1024 devices (fsdp 8 x expert 32 x context 4); memory, both exchanges, and
  the AOT lowering of the step from ShapeDtypeStructs."""
  assert cli.main(["info", V3, "--mesh", "data=1,fsdp=8,expert=32,context=4", "--batch", "256", "--seq", "131072",
                   "--lower", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)["mesh"]
  assert r["devices"] == 1024 and r["lower"]["lowered"]
  c = r["context_exchange"]
  assert c["values_per_token"] == 576 and c["attention_layers"] == 61 + 1
  assert c["bytes_per_exchange"] == int(256 / 256 * 131072 * 576 * 2 * 3 / 4)
