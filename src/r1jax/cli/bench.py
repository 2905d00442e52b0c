"""`r1jax bench ...`: the benchmarks (r1jax.bench) with JSON output."""

from __future__ import annotations

import dataclasses
import json

from r1jax import config as config_lib
from r1jax.cli.common import parse_mesh
from r1jax.config import ConfigError, MeshConfig


def parse_arms(texts) -> dict[str, list[str]]:
  """`NAME:section.field=value[,section.field=value]` per text -> {NAME: overrides} (bench fp8 --arm)."""
  arms = {}
  for text in texts:
    name, sep, overrides = text.partition(":")
    if not sep or not name or not overrides or name in arms or name in ("off", "on", "off_lr_x1.001"):
      raise ConfigError(f"--arm {text!r}: expected NAME:section.field=value[,...] with a new NAME")
    arms[name] = overrides.split(",")
  return arms


def bench(args) -> int:
  args.config = args.config or ("configs/tiny_r1zero.yaml" if args.what in ("rl-demo", "async")
                                else "configs/bench_gpu.yaml")
  cfg = config_lib.load(args.config, args.overrides)  # a config error stops here, before jax starts
  if args.what == "sampler":
    from r1jax.bench.sampler import bench_sampler, bench_skewed

    result = (bench_skewed(cfg, args.batch, args.skewed, args.prompt_len, args.new_tokens, args.repeats)
              if args.skewed else
              bench_sampler(cfg, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.speculative))
  elif args.what == "grpo":
    from r1jax.bench.grpo import bench_grpo

    result = bench_grpo(cfg, args.steps or 4)
  elif args.what == "fp8":
    from r1jax.bench.fp8 import bench_fp8

    result = bench_fp8(cfg, args.steps or 10, gemms=not args.train_only, seeds=args.seeds,
                       first_seed=args.first_seed, arms=parse_arms(args.arm))
  elif args.what == "async":
    from r1jax import loop
    from r1jax.bench.async_rollouts import bench_async

    arms = parse_arms(args.arm) if args.arm else None
    result = bench_async(cfg, loop.run_directory(cfg, args.config), seeds=args.seeds, arms=arms)
  elif args.what == "experts":
    from r1jax.bench.experts import bench_experts

    result = bench_experts(cfg, args.tokens, arms=args.arm or None)
  elif args.what == "train":
    from r1jax.bench.train import bench_train

    if args.mesh:
      cfg = dataclasses.replace(cfg, mesh=MeshConfig(**parse_mesh(args.mesh)))
    result = bench_train(cfg, args.steps or 10, packed=args.packed)
  else:
    from r1jax import loop
    from r1jax.bench.rl_demo import bench_rl_demo

    result = bench_rl_demo(cfg, loop.run_directory(cfg, args.config))
  print(json.dumps(result, indent=None if args.json else 2))
  return 0
