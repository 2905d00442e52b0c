"""The commands that train or sample: sft, grpo, pipeline (each a run directory that resumes), eval, generate
and plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from r1jax.cli.common import run_training
from r1jax.config import ConfigError


def sft(args) -> int:
  return run_training(args, "r1jax.loop:fit", "metrics.jsonl, events/, plots/, checkpoints/")


def grpo(args) -> int:
  return run_training(args, "r1jax.rl.pipeline:r1_zero",
                      "base/ and grpo/: metrics.jsonl, events/, plots/, checkpoints/; grpo/samples.jsonl")


def pipeline(args) -> int:
  if args.seeds > 1:
    return run_training(args, "r1jax.rl.pipeline:run_seeds", "seed-S/ per seed, each with one directory per stage; "
                        "seeds.md, seeds.json", seeds=args.seeds)
  return run_training(args, "r1jax.rl.pipeline:run", "one directory per stage; report.md, report.json, report.png")


def evaluate(args) -> int:
  from r1jax import checkpoint, sharding
  from r1jax.rl import rollouts

  cfg = checkpoint.load_config(args.ckpt, args.overrides)
  mesh = sharding.make_mesh(cfg.mesh)
  import jax

  with jax.set_mesh(mesh):
    params = checkpoint.load_params(args.ckpt, cfg, mesh)
    result = rollouts.evaluate(params, cfg, args.n, args.k, args.split)
  print(json.dumps({"task": rollouts.task_name(cfg), "split": args.split, **result}))
  return 0


def read_prompts(path: str | Path) -> list[str]:
  """Prompts from a JSONL file of {"prompt": str} records; a bad line is an error naming file:line."""
  prompts = []
  for n, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise ConfigError(f"{path}:{n}: expected an object with a string \"prompt\"")
    prompts.append(record["prompt"])
  if not prompts:
    raise ConfigError(f"{path}: no prompts (the file is empty)")
  return prompts


def generate(args) -> int:
  from r1jax import checkpoint, sampler, sharding, tokenizer

  cfg = checkpoint.load_config(args.ckpt, args.overrides)
  prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
  if not prompts:
    raise ConfigError("generate: give --prompt TEXT or --prompts FILE.jsonl")
  tok = tokenizer.load(cfg.data.tokenizer)
  mesh = sharding.make_mesh(cfg.mesh)
  import time

  import jax
  from rich.progress import Progress

  with jax.set_mesh(mesh):
    params = checkpoint.load_params(args.ckpt, cfg, mesh)
    ids = [tokenizer.prompt_ids(tok, p) for p in prompts]
    budget = len(prompts) * cfg.sampler.max_new_tokens
    with Progress(transient=True) as bar:
      task = bar.add_task("generating", total=budget)
      t0 = time.perf_counter()
      out = sampler.generate(params, ids, cfg.model, cfg.compute, cfg.sampler, eos_id=tok.eos_ids, pad_id=tok.pad_id,
                             key=jax.random.key(args.seed), on_chunk=lambda n: bar.update(task, completed=n))
      texts = sampler.completions(out)
      seconds = time.perf_counter() - t0
  n_tokens = sum(len(t) for t in texts)
  for prompt, completion in zip(prompts, texts):
    print(f"{prompt}{tokenizer.completion_text(tok, completion)}")
  print(f"{n_tokens} tokens in {seconds:.2f}s ({n_tokens / seconds:.1f} tokens/s, compilation included)",
        file=sys.stderr)
  return 0


def plot(args) -> int:
  from r1jax import metrics

  for path in metrics.plot_run(args.run):
    print(path)
  return 0
