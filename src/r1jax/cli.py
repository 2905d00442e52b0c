"""`r1jax` command line. Config errors print one line and exit 2, before anything is compiled."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from r1jax import config as config_lib


def _info(args) -> int:
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import cost, model

  counts = model.param_count(cfg.model)
  flops = cost.train_flops_per_token(counts, cfg.model, cfg.train.seq_len)
  report = {"config": args.config, "params": counts, "train_flops_per_token": flops}
  if args.mesh or args.lower:
    from r1jax import memory

    report["mesh"] = memory.cli_report(cfg, args.mesh, args.batch, args.seq, args.link_gbps, args.lower)
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  from rich.console import Console
  from rich.table import Table

  table = Table(title=f"{args.config}: parameters")
  table.add_column("part")
  table.add_column("params", justify="right")
  for part, n in counts["parts"].items():
    table.add_row(part, f"{n / 1e9:.3f}B")
  for key in ["total", "active", "active_without_embedding", "mtp", "total_with_mtp"]:
    table.add_row(f"[bold]{key}", f"[bold]{counts[key] / 1e9:.3f}B")
  Console().print(table)
  print(f"train FLOPs/token at seq_len {flops['seq_len']}: {flops['total']:.4g} "
        f"(6*N_active {flops['matmul']:.4g} + attention {flops['attention']:.4g})")
  if "mesh" in report:
    print(memory.format_report(report["mesh"]))
  return 0


def _cost(args) -> int:
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import cost, model

  result = cost.report(model.param_count(cfg.model), cfg.model, cfg.train.seq_len, args.tokens, args.gpu,
                       args.precision, args.mfu, args.price, args.gpu_hours)
  if args.fleet:
    result["fleet"] = {"gpus": args.fleet, "hours": args.fleet_hours, "price_per_gpu_hour": args.price,
                       "dollars": cost.fleet_dollars(args.fleet, args.price, args.fleet_hours)}
  if args.json:
    print(json.dumps(result, indent=2))
    return 0
  r = result
  print(f"{args.config}: {r['tokens']:.4g} tokens x {r['flops_per_token']['total']:.4g} FLOPs/token "
        f"(6 x active {r['flops_per_token']['matmul']:.4g} + attention at seq {cfg.train.seq_len}) = {r['train_flops']:.4g} FLOPs")
  print(f"{args.gpu} {args.precision} peak {r['peak_flops_per_gpu'] / 1e12:.1f} TFLOP/s at MFU {args.mfu:.0%}: "
        f"{r['gpu_hours_at_mfu'] / 1e6:.3f}M GPU-hours = ${r['dollars_at_mfu'] / 1e6:.3f}M at ${args.price}/h")
  if args.gpu_hours is not None:
    print(f"reported {args.gpu_hours / 1e6:.3f}M GPU-hours x ${args.price}/h = ${r['reported_dollars'] / 1e6:.3f}M; "
          f"implied MFU {r['implied_mfu']:.1%} of the {args.precision} peak")
  if args.fleet:
    f = r["fleet"]
    print(f"{f['gpus']:,} GPUs x ${args.price}/h x {f['hours']:g} h = ${f['dollars'] / 1e6:.2f}M")
  return 0


def _sft(args) -> int:
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import distributed  # before jax initialises its backends

  joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)
  from r1jax import data, loop

  run_dir = loop.run_directory(cfg, args.config)
  try:
    loop.fit(cfg, run_dir, resume=args.resume)
  except loop.TrainingStopped as e:
    print(f"r1jax: {e}", file=sys.stderr)
    return 3
  except data.DataError as e:  # a bad record: `file:line: reason`, no traceback
    print(f"r1jax: data error: {e}", file=sys.stderr)
    return 2
  finally:
    if joined:
      import jax

      jax.distributed.shutdown()
  print(f"run directory: {run_dir} (metrics.jsonl, events/, plots/, checkpoints/)")
  return 0


def _train_command(args, train_fn, outputs: str) -> int:
  """A training command (grpo, pipeline): join a multi-process run if asked, run, report errors in one line."""
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import distributed

  joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)
  from r1jax import data, loop

  run_dir = loop.run_directory(cfg, args.config)
  try:
    train_fn(cfg, run_dir, resume=args.resume)
  except loop.TrainingStopped as e:
    print(f"r1jax: {e}", file=sys.stderr)
    return 3
  except data.DataError as e:
    print(f"r1jax: data error: {e}", file=sys.stderr)
    return 2
  finally:
    if joined:
      import jax

      jax.distributed.shutdown()
  print(f"run directory: {run_dir} ({outputs})")
  return 0


def _grpo(args) -> int:
  from r1jax.rl import pipeline

  return _train_command(args, pipeline.r1_zero,
                        "base/ and grpo/: metrics.jsonl, events/, plots/, checkpoints/; grpo/samples.jsonl")


def _pipeline(args) -> int:
  from r1jax.rl import pipeline

  return _train_command(args, pipeline.run, "one directory per stage; report.md, report.json, report.png")


def _eval(args) -> int:
  from r1jax import checkpoint, sharding
  from r1jax.rl import rollouts

  cfg = checkpoint.load_config(args.ckpt, args.overrides)
  mesh = sharding.make_mesh(cfg.mesh)
  import jax

  with jax.set_mesh(mesh):
    params = checkpoint.load_params(args.ckpt, cfg, mesh)
    result = rollouts.evaluate(params, cfg, args.n, args.k, args.split)
  print(json.dumps({"task": cfg.grpo.task, "split": args.split, **result}))
  return 0


def _generate(args) -> int:
  from r1jax import checkpoint, sampler, sharding, tokenizer

  cfg = checkpoint.load_config(args.ckpt, args.overrides)
  prompts = list(args.prompt or []) + (sampler.read_prompts(args.prompts) if args.prompts else [])
  if not prompts:
    raise config_lib.ConfigError("generate: give --prompt TEXT or --prompts FILE.jsonl")
  tok = tokenizer.load(cfg.data.tokenizer)
  mesh = sharding.make_mesh(cfg.mesh)
  import time

  import jax
  from rich.progress import Progress

  with jax.set_mesh(mesh):
    params = checkpoint.load_params(args.ckpt, cfg, mesh)
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    budget = len(prompts) * cfg.sampler.max_new_tokens
    with Progress(transient=True) as bar:
      task = bar.add_task("generating", total=budget)
      t0 = time.perf_counter()
      out = sampler.generate(params, ids, cfg.model, cfg.sampler, eos_id=tok.eos_id, pad_id=tok.pad_id,
                             key=jax.random.key(args.seed), on_chunk=lambda n: bar.update(task, completed=n))
      texts = sampler.completions(out)
      seconds = time.perf_counter() - t0
  n_tokens = sum(len(t) for t in texts)
  for prompt, completion in zip(prompts, texts):
    print(f"{prompt}{tok.decode([i for i in completion if i != tok.eos_id])}")
  print(f"{n_tokens} tokens in {seconds:.2f}s ({n_tokens / seconds:.1f} tokens/s, compilation included)",
        file=sys.stderr)
  return 0


def _bench(args) -> int:
  args.config = args.config or ("configs/tiny_r1zero.yaml" if args.what == "rl-demo" else "configs/bench_gpu.yaml")
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import bench

  if args.what == "sampler":
    result = bench.bench_sampler(cfg, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.speculative)
  elif args.what == "grpo":
    result = bench.bench_grpo(cfg, args.steps or 4)
  elif args.what == "fp8":
    result = bench.bench_fp8(cfg, args.steps or 10, gemms=not args.train_only, seeds=args.seeds,
                             first_seed=args.first_seed, arms=bench.parse_arms(args.arm))
  elif args.what == "train":
    if args.mesh:
      from r1jax import memory

      cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(**memory.parse_mesh(args.mesh)))
    result = bench.bench_train(cfg, args.steps or 10, packed=args.packed)
  else:
    from r1jax import loop

    result = bench.bench_rl_demo(cfg, loop.run_directory(cfg, args.config))
  print(json.dumps(result, indent=None if args.json else 2))
  return 0


def _plot(args) -> int:
  from r1jax import metrics

  for path in metrics.plot_run(args.run):
    print(path)
  return 0


def _import_hf(args) -> int:
  from r1jax.interop import hf

  return hf.import_command(args.dir, args.out, args.overrides)


def _export_hf(args) -> int:
  from r1jax.interop import hf

  return hf.export_command(args.ckpt, args.dir, args.overrides, args.arch, args.dtype, args.max_shard_gb)


def _multiprocess_args(p):
  multi = p.add_argument_group("multi-process runs (TPU pods, SLURM, Open MPI and JAX_COORDINATOR_ADDRESS are "
                               "detected; elsewhere give all three)")
  multi.add_argument("--coordinator", help="host:port of process 0")
  multi.add_argument("--num-processes", type=int)
  multi.add_argument("--process-id", type=int)
  multi.add_argument("--cpu-devices", type=int, default=0, help="simulated CPU devices per process (0: real devices)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="r1jax", description="DeepSeek-V3 / R1 in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("info", help="parameter counts and FLOPs of a config")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--json", action="store_true")
  p.add_argument("--mesh", help="per-device memory and all-to-all traffic on this mesh, e.g. data=1,fsdp=8,expert=32")
  p.add_argument("--batch", type=int, help="global batch (default: train.batch_size)")
  p.add_argument("--seq", type=int, help="sequence length (default: train.seq_len)")
  p.add_argument("--link-gbps", type=float, default=400.0,
                 help="per-device all-to-all bandwidth in GB/s (NVLink: H800 400, H100 900)")
  p.add_argument("--lower", action="store_true",
                 help="also lower the train step on an abstract mesh; compile for XLA's memory analysis if the "
                      "backend has that many devices")
  p.set_defaults(fn=_info)
  p = sub.add_parser("cost", help="training FLOPs, GPU-hours and dollars of a config for a token count")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--tokens", type=float, default=14.8e12, help="training tokens (V3: 14.8T)")
  p.add_argument("--gpu", default="h800", help="h800, h100, h200, a100")
  p.add_argument("--precision", default="bf16", help="the peak MFU is measured against: bf16 or fp8")
  p.add_argument("--mfu", type=float, default=0.35)
  p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour")
  p.add_argument("--gpu-hours", type=float, help="a reported GPU-hour figure: its dollars and implied MFU")
  p.add_argument("--fleet", type=int, default=0, help="GPUs rented for --fleet-hours (e.g. 50000)")
  p.add_argument("--fleet-hours", type=float, default=168.0)
  p.add_argument("--json", action="store_true")
  p.set_defaults(fn=_cost)
  p = sub.add_parser("sft", help="supervised training of a config on a built-in task (one process or many)")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir/train.name")
  _multiprocess_args(p)
  p.set_defaults(fn=_sft)
  p = sub.add_parser("grpo", help="R1-Zero: optional base SFT on task text, then GRPO with rule-based rewards")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir/train.name")
  _multiprocess_args(p)
  p.set_defaults(fn=_grpo)
  p = sub.add_parser("pipeline", help="the R1 recipe: base, R1-Zero, cold start, RL, rejection sampling, SFT, RL, "
                                       "distillation into a dense student; then a report")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--resume", action="store_true", help="continue the unfinished stage (finished ones are skipped)")
  _multiprocess_args(p)
  p.set_defaults(fn=_pipeline)
  p = sub.add_parser("eval", help="greedy accuracy, format rate and pass@k of a checkpoint on grpo.task")
  p.add_argument("ckpt")
  p.add_argument("overrides", nargs="*", help="section.field=value (e.g. grpo.task=reverse)")
  p.add_argument("--n", type=int, default=100, help="problems")
  p.add_argument("--k", type=int, default=1, help="samples per problem for pass@k (1: greedy only)")
  p.add_argument("--split", choices=["eval", "train"], default="eval")
  p.set_defaults(fn=_eval)
  p = sub.add_parser("generate", help="completions of prompts from a checkpoint or run directory (KV-cache sampler; "
                     "sampler.temperature=0 is greedy, sampler.max_new_tokens=N the budget)")
  p.add_argument("ckpt")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  p.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} records")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=_generate)
  p = sub.add_parser("bench", help="benchmarks with JSON output")
  p.add_argument("what", choices=["train", "fp8", "sampler", "grpo", "rl-demo"])
  p.add_argument("--config", help="default: configs/bench_gpu.yaml (train, fp8, sampler, grpo), "
                 "configs/tiny_r1zero.yaml (rl-demo)")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--speculative", action="store_true", help="sampler: MTP speculative decoding (greedy)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (train: 10 after 2 warm-up; grpo: 4, the first "
                 "compiles)")
  p.add_argument("--packed", type=int, default=0, help="train: packed segments per row (0: one sequence per row)")
  p.add_argument("--mesh", help="train: e.g. data=2,expert=4 (missing axes 1; default: the config's mesh)")
  p.add_argument("--train-only", action="store_true", help="fp8: the train steps alone (no GEMM/quantiser tables)")
  p.add_argument("--seeds", type=int, default=1, help="fp8: loss curves from this many inits per arm")
  p.add_argument("--first-seed", type=int, default=0, help="fp8: the first of those seeds (to pool several calls)")
  p.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                 help="fp8: one more FP8-on arm, with these overrides, in the interleaved speed run (repeatable)")
  p.add_argument("--json", action="store_true", help="one line of JSON")
  p.set_defaults(fn=_bench)
  p = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl into RUN/plots/ (also while it trains)")
  p.add_argument("run")
  p.set_defaults(fn=_plot)
  p = sub.add_parser("import-hf", help="Hugging Face model directory -> r1jax checkpoint")
  p.add_argument("dir")
  p.add_argument("out")
  p.add_argument("overrides", nargs="*", help="section.field=value (e.g. model.param_dtype=bfloat16, mesh.fsdp=8)")
  p.set_defaults(fn=_import_hf)
  p = sub.add_parser("export-hf", help="r1jax checkpoint -> Hugging Face model directory")
  p.add_argument("ckpt")
  p.add_argument("dir")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--arch", choices=["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2ForCausalLM",
                                    "LlamaForCausalLM"], help="default: the one the config describes")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: model.param_dtype")
  p.add_argument("--max-shard-gb", type=float, default=5.0)
  p.set_defaults(fn=_export_hf)
  args = parser.parse_args(argv)
  try:
    return args.fn(args)
  except config_lib.ConfigError as e:
    print(f"r1jax: config error: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:
    print(f"r1jax: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
