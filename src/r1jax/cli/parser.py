"""The `r1jax` command line: one argument parser; each command lives in its module here. Config errors print
one line and exit 2, before anything is compiled."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from r1jax.cli.common import fail, multiprocess_args
from r1jax.config import ConfigError


def positive(text: str) -> int:
  """An argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
  """Overrides (`section.field=value`) may come anywhere after the command, flags among them; anything else
  unknown is argparse's usual error."""
  args, extra = parser.parse_known_args(argv)
  unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if extra:
    args.overrides = [*args.overrides, *extra]
  return args


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="r1jax", description="DeepSeek-V3 / R1 in JAX", allow_abbrev=False)
  # No abbreviated flags: `--resum` is a typo to report, not `--resume`.
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
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
  p.set_defaults(command_fn="info:info")
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
  p.set_defaults(command_fn="info:cost_command")
  p = sub.add_parser("sft", help="supervised training of a config on a built-in task (one process or many)")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir/train.name")
  multiprocess_args(p)
  p.set_defaults(command_fn="train:sft")
  p = sub.add_parser("grpo", help="R1-Zero: optional base SFT on task text, then GRPO with rule-based rewards")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir/train.name")
  multiprocess_args(p)
  p.set_defaults(command_fn="train:grpo")
  p = sub.add_parser("pipeline", help="the R1 recipe: base, R1-Zero, cold start, RL, rejection sampling, SFT, RL, "
                                       "distillation into a dense student; then a report")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--resume", action="store_true", help="continue the unfinished stage (finished ones are skipped)")
  p.add_argument("--seeds", type=positive, default=1, help="run the whole pipeline for train.seed, train.seed+1, ... "
                 "(one seed-S/ directory each) and report every stage's mean, min and max over them")
  multiprocess_args(p)
  p.set_defaults(command_fn="train:pipeline")
  p = sub.add_parser("eval", help="greedy accuracy, format rate and pass@k of a checkpoint on grpo.task")
  p.add_argument("ckpt")
  p.add_argument("overrides", nargs="*", help="section.field=value (e.g. grpo.task=reverse)")
  p.add_argument("--n", type=positive, default=100, help="problems")
  p.add_argument("--k", type=positive, default=1, help="samples per problem for pass@k (1: greedy only)")
  p.add_argument("--split", choices=["eval", "train"], default="eval")
  p.set_defaults(command_fn="train:evaluate")
  p = sub.add_parser("generate", help="completions of prompts from a checkpoint or run directory (KV-cache sampler; "
                     "sampler.temperature=0 is greedy, sampler.max_new_tokens=N the budget)")
  p.add_argument("ckpt")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  p.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} records")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(command_fn="train:generate")
  p = sub.add_parser("bench", help="benchmarks with JSON output")
  p.add_argument("what", choices=["train", "fp8", "sampler", "grpo", "rl-demo", "async", "experts"])
  p.add_argument("--config", help="default: configs/bench_gpu.yaml (train, fp8, sampler, grpo), "
                 "configs/tiny_r1zero.yaml (rl-demo, async)")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--speculative", action="store_true", help="sampler: MTP speculative decoding (greedy)")
  p.add_argument("--skewed", type=int, default=0, metavar="N", help="sampler: N prompts with long-tailed budgets "
                 "(mean --new-tokens), static batches of --batch rows vs continuous batching with --batch slots")
  p.add_argument("--steps", type=int, default=None, help="timed steps (train: 10 after 2 warm-up; grpo: 4, the first "
                 "compiles)")
  p.add_argument("--packed", type=int, default=0, help="train: packed segments per row (0: one sequence per row)")
  p.add_argument("--mesh", help="train: e.g. data=2,expert=4 (missing axes 1; default: the config's mesh)")
  p.add_argument("--train-only", action="store_true", help="fp8: the train steps alone (no GEMM/quantiser tables)")
  p.add_argument("--seeds", type=int, default=1, help="fp8: loss curves from this many inits per arm; async: "
                 "seeds, each one base stage and one GRPO run per arm")
  p.add_argument("--first-seed", type=int, default=0, help="fp8: the first of those seeds (to pool several calls)")
  p.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                 help="fp8: one more FP8-on arm, with these overrides, in the interleaved speed run; async: the arms "
                 "run besides sync (default async:grpo.async=true,mesh.rollout_devices=<half>,grpo.max_staleness=1) "
                 "(repeatable); experts: the arms to run (default all)")
  p.add_argument("--tokens", type=int, default=16384, help="experts: tokens through the layer")
  p.add_argument("--json", action="store_true", help="one line of JSON")
  p.set_defaults(command_fn="bench:bench")
  p = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl into RUN/plots/ (also while it trains)")
  p.add_argument("run")
  p.set_defaults(command_fn="train:plot")
  p = sub.add_parser("import-hf", help="Hugging Face model directory -> r1jax checkpoint")
  p.add_argument("dir")
  p.add_argument("out")
  p.add_argument("overrides", nargs="*", help="section.field=value (e.g. compute.param_dtype=bfloat16, mesh.fsdp=8)")
  p.set_defaults(command_fn="hf:import_hf")
  p = sub.add_parser("export-hf", help="r1jax checkpoint -> Hugging Face model directory")
  p.add_argument("ckpt")
  p.add_argument("dir")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--arch", choices=["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2ForCausalLM",
                                    "LlamaForCausalLM"], help="default: the one the config describes")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: compute.param_dtype")
  p.add_argument("--max-shard-gb", type=float, default=5.0)
  p.set_defaults(command_fn="hf:export_hf")
  args = parse(parser, argv)
  module, name = args.command_fn.split(":")
  try:  # a command's module is imported when it runs: `r1jax --help` and config errors never wait for jax
    return getattr(importlib.import_module(f"r1jax.cli.{module}"), name)(args)
  except ConfigError as e:
    return fail(f"config error: {e}")
  except FileNotFoundError as e:
    return fail(str(e))


if __name__ == "__main__":
  sys.exit(main())
