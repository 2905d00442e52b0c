"""The R1 recipe as stages of the one training loop, each in its own run directory under the run:
R1-Zero is `base/` (optional SFT on a task's cold-start text, standing in for a pretrained base model) then
`grpo/` (GRPO with rule-based rewards from that checkpoint, or from `grpo.init`)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import checkpoint, loop, sharding
from r1jax import config as config_lib
from r1jax.config import ConfigError, RunConfig
from r1jax.rl import async_rollouts, grpo, rollouts


def base_config(cfg: RunConfig) -> RunConfig:
  """The base stage: SFT on `rl:<task>` text for grpo.base_steps steps."""
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=f"rl:{cfg.grpo.task}"),
                             train=dataclasses.replace(cfg.train, steps=cfg.grpo.base_steps))


def grpo_config(cfg: RunConfig) -> RunConfig:
  """The GRPO stage: optim.lr replaced by grpo.lr when that is set."""
  if not cfg.grpo.lr:
    return cfg
  return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.grpo.lr))


def with_init(cfg: RunConfig) -> RunConfig:
  """A run from grpo.init takes the checkpoint's architecture (an `r1jax import-hf` checkpoint of any model
  import supports), and its tokenizer directory where the config names none; each change is said."""
  if not cfg.grpo.init:
    return cfg
  saved = checkpoint.load_config(cfg.grpo.init)
  if saved.model != cfg.model:
    print(f"grpo.init={cfg.grpo.init}: the model section is the checkpoint's ({saved.model.attention}, "
          f"{saved.model.n_layers} layers, dim {saved.model.dim}, vocab {saved.model.vocab_size})", flush=True)
    cfg = dataclasses.replace(cfg, model=saved.model)
  tok_dir = checkpoint.tokenizer_dir(cfg.grpo.init)
  if cfg.data.tokenizer == "bytes" and tok_dir is not None:
    print(f"grpo.init={cfg.grpo.init}: data.tokenizer is the checkpoint's, {tok_dir}", flush=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok_dir)))
  return cfg


def check_grpo(cfg: RunConfig):
  """One-line errors before any stage trains: unknown reward or GRPO variant names, greedy sampling (every
  completion of a group would be the same, so every advantage 0), and every line of a problems file."""
  from r1jax.rl import problems, rewards, verifiers

  try:
    rewards.parse(cfg.grpo.rewards)
    grpo.check(cfg.grpo)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    verifiers.get(cfg.grpo.verifier)
  except ValueError as e:
    raise ConfigError(f"grpo.verifier: {e}") from None
  if cfg.grpo.language not in {**rewards.LANGUAGES, **rewards.SCRIPTS}:
    raise ConfigError(f"grpo.language={cfg.grpo.language!r}: known languages {', '.join(rewards.LANGUAGES)}; "
                      f"scripts {', '.join(rewards.SCRIPTS)}")
  if cfg.sampler.temperature == 0:
    raise ConfigError("sampler.temperature=0: GRPO needs sampled completions (greedy groups are identical, "
                      "so every advantage is 0); evaluation is greedy on its own")
  if cfg.grpo.async_rollouts and not cfg.mesh.rollout_devices:
    raise ConfigError("grpo.async_rollouts=true: set mesh.rollout_devices, the devices that sample (the rest learn)")
  if cfg.mesh.rollout_devices and not cfg.grpo.async_rollouts:
    raise ConfigError(f"mesh.rollout_devices={cfg.mesh.rollout_devices}: only asynchronous rollouts split the "
                      "mesh; set grpo.async_rollouts=true, or leave mesh.rollout_devices at 0")
  if cfg.grpo.async_rollouts:
    sharding.sub_meshes(cfg.mesh)  # the split and both sub-meshes' axis sizes, before anything trains
  if cfg.data.problems:
    print(problems.describe(cfg), flush=True)


def _stage_done(run_dir: Path, steps: int) -> bool:
  directory = run_dir / "checkpoints"
  return directory.is_dir() and checkpoint.Manager(directory).steps()[-1:] == [steps]


def set_aside_stale(stage_dir: Path, parent: str):
  """A stage directory that exists while its parent is still being trained was built on an unfinished parent
  (by a run that did not stop at the parent's interruption): it is moved to STAGE.stale-N, kept, and redone."""
  if not stage_dir.exists():
    return
  n = 1
  while stage_dir.with_name(f"{stage_dir.name}.stale-{n}").exists():
    n += 1
  aside = stage_dir.with_name(f"{stage_dir.name}.stale-{n}")
  if jax.process_index() == 0:
    stage_dir.rename(aside)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"r1jax set aside {stage_dir.name}")
  print(f"{stage_dir} was built on an unfinished {parent}: moved to {aside.name}; it is redone", flush=True)


def _ref_logp_fn(ref_params, cfg: RunConfig):
  """Log-probs of the frozen reference (the starting checkpoint) for the k3 KL term."""
  model_cfg = dataclasses.replace(cfg.model, n_mtp=0)
  ref_params = jax.tree.map(jnp.copy, ref_params)  # its own buffers: the train state's params are donated
  fn = jax.jit(lambda p, b: grpo.learner_logp(p, b, model_cfg, cfg.compute, cfg.sampler.temperature,
                                              cfg.grpo.routing_replay, cfg.grpo.keep_sampling_mask)[0])
  return lambda batch: fn(ref_params, batch)


def r1_zero(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> list[dict]:
  """Base stage (unless grpo.init names a checkpoint), then GRPO; returns the GRPO stage's metrics."""
  cfg = with_init(cfg)
  run_dir, g = Path(run_dir), cfg.grpo
  check_grpo(cfg)
  if cfg.train.grad_accum != 1:
    raise ConfigError(f"train.grad_accum={cfg.train.grad_accum}: a GRPO step is one batch of "
                      "grpo.prompts_per_step x grpo.group_size rollouts (grad_accum applies to SFT only)")
  init_dir = g.init or None
  if not init_dir and g.base_steps:
    if cfg.data.problems:
      raise ConfigError(f"grpo.base_steps={g.base_steps}: the base stage trains on grpo.task's text, and "
                        "data.problems has none; start from grpo.init (an r1jax import-hf checkpoint)")
    base_dir = run_dir / "base"
    if not _stage_done(base_dir, g.base_steps):
      set_aside_stale(run_dir / "grpo", "base")
      loop.fit(base_config(cfg), base_dir, resume=resume and (base_dir / "checkpoints").is_dir())
    init_dir = base_dir
  if g.kl_beta > 0 and not init_dir:
    raise ConfigError(f"grpo.kl_beta={g.kl_beta}: the KL reference is the starting checkpoint; set grpo.init "
                      "or grpo.base_steps")
  cfg = grpo_config(cfg)
  if g.async_rollouts:  # the learner trains on its sub-mesh; the sampler thread has the other
    mesh, sampler_mesh = sharding.sub_meshes(cfg.mesh)
  else:
    mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    init_params = checkpoint.load_params(init_dir, cfg, mesh) if init_dir else None
    grpo_dir = run_dir / "grpo"
    grpo_dir.mkdir(parents=True, exist_ok=True)
    if init_params is not None and not resume:
      before = rollouts.evaluate(init_params, cfg, g.eval_prompts)
      (grpo_dir / "eval_before.json").write_text(json.dumps(before))
      print(f"before GRPO: eval accuracy {before['accuracy']:.3f}, format {before['format']:.3f}", flush=True)
    ref_fn = _ref_logp_fn(init_params, cfg) if g.kl_beta > 0 else None
    samples = grpo_dir / "samples.jsonl"
    if g.async_rollouts:
      source = async_rollouts.AsyncRolloutSource(cfg, mesh, sampler_mesh, ref_fn, samples_path=samples)
    else:
      source = rollouts.RolloutSource(cfg, mesh, ref_fn, samples_path=samples)
  step_fn = functools.partial(grpo.grpo_step, gcfg=g, temperature=cfg.sampler.temperature,
                              norm_len=cfg.sampler.max_new_tokens)

  def after_step(step: int, state) -> dict:
    if step % g.eval_every and step != cfg.train.steps:
      return {}
    return {f"eval_{k}": v for k, v in rollouts.evaluate(state.params, cfg, g.eval_prompts).items() if k != "n"}

  return loop.fit(cfg, grpo_dir, resume=resume, step_fn=step_fn, source=source, init_params=init_params,
                  after_step=after_step, mesh=mesh)


# ---------------------------------------------------------------------------------------------------------
# The R1 pipeline (R1 paper §2.3): every stage is one run directory under the pipeline's, started from the
# final checkpoint of the stage it builds on; a finished stage is skipped on rerun, an unfinished one resumes.

STARTS = {"r1zero": "base", "cold_start": "base", "rl": "cold_start", "sft": "base", "final_rl": "sft"}
NEEDS = {**{k: (v,) for k, v in STARTS.items()}, "rejection": ("rl",), "sft": ("base", "rejection"),
         "distill": ("final_rl",)}
EVALUATED = ("base", "r1zero", "cold_start", "rl", "sft", "final_rl", "distill")


def _with(cfg: RunConfig, **sections) -> RunConfig:
  """cfg with fields of some sections replaced: _with(cfg, train={"steps": 3})."""
  return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def _finished(stage_dir: Path, stage_cfg: RunConfig, steps: int) -> bool:
  """Whether the stage has its final checkpoint; if so, one the command's config could have produced (a
  refused change, e.g. to the architecture, is a one-line error here rather than a shape error later)."""
  if not _stage_done(stage_dir, steps):
    return False
  checkpoint.check_resume(stage_dir, stage_cfg, write=False)
  return True


def _sft_stage(cfg: RunConfig, stage_dir: Path, source: str, steps: int, init_dir, resume: bool, **data) -> bool:
  stage_cfg = _with(cfg, data={"source": source, **data}, train={"steps": steps})
  if _finished(stage_dir, stage_cfg, steps):
    return False
  init = None
  if init_dir is not None:
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
      init = checkpoint.load_params(init_dir, stage_cfg, mesh)
  loop.fit(stage_cfg, stage_dir, resume=resume and (stage_dir / "checkpoints").is_dir(), init_params=init)
  return True


def _grpo_stage(cfg: RunConfig, stage_dir: Path, steps: int, init_dir: Path, resume: bool) -> bool:
  stage_cfg = _with(grpo_config(cfg), train={"steps": steps}, grpo={"init": str(init_dir), "base_steps": 0})
  if _finished(stage_dir / "grpo", stage_cfg, steps):
    return False
  r1_zero(stage_cfg, stage_dir, resume=resume and (stage_dir / "grpo" / "checkpoints").is_dir())
  return True


class TooFewSamples(ConfigError):
  """Rejection sampling kept fewer than pipeline.min_kept samples: the model it sampled has not learned the
  task, and SFT on a handful of samples would only memorise them."""


def rejection_sample(cfg: RunConfig, model_dir: Path, out_path: Path, key_offset: int = 2) -> dict:
  """R1 §2.3.3: k completions for each of n train prompts from a model (the rl stage's; for distillation the
  final model's), keeping only those the task checker accepts and that are well formed, written as an SFT
  JSONL (prompt, completion). The sampling key is train.seed + key_offset."""
  from r1jax import continuous_batching, sampler, tokenizer

  p = cfg.pipeline
  tok = tokenizer.load(cfg.data.tokenizer)
  examples = rollouts.task_examples(cfg, "train", p.rejection_prompts)
  prompts = [tokenizer.prompt_ids(tok, ex.prompt) for ex in examples for _ in range(p.rejection_k)]
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    params = checkpoint.load_params(model_dir, cfg, mesh)
    out = continuous_batching.rollout(params, prompts, cfg.model, cfg.compute, cfg.sampler, eos_id=tok.eos_ids,
                                      pad_id=tok.pad_id, key=jax.random.key(cfg.train.seed + key_offset))
  completions = sampler.completions(out)
  texts = [tokenizer.completion_text(tok, ids) for ids in completions]
  finished = [tokenizer.finished(tok, ids) for ids in completions]
  kept = keep_correct([examples[i // p.rejection_k] for i in range(len(texts))], texts, finished)
  if len(kept) < p.min_kept:
    raise TooFewSamples(f"rejection sampling kept {len(kept)} of {len(prompts)} samples from {model_dir}, fewer than "
                        f"pipeline.min_kept={p.min_kept}: that model has not learned the task; train the stages "
                        "before it longer")
  if jax.process_index() == 0:  # every process computed the same samples; one writes them
    tmp = out_path.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.rename(out_path)  # whole or absent: a rerun never trains on half a file
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("r1jax rejection data written")
  return {"samples": len(prompts), "kept": len(kept)}


def _sample_once(cfg: RunConfig, model_dir: Path, out_path: Path, key_offset: int = 2) -> bool:
  """Rejection-sample `model_dir` into `out_path` (stats beside it) unless a finished file is there."""
  if out_path.exists():
    return False
  stats = rejection_sample(cfg, model_dir, out_path, key_offset)
  if jax.process_index() == 0:
    out_path.with_name(out_path.stem + "_stats.json").write_text(json.dumps(stats))
  return True


def keep_correct(examples, texts: list[str], finished: list[bool]) -> list[dict]:
  """The samples rejection sampling keeps: finished (EOS), accepted by the task's checker, well formed;
  each distinct (prompt, completion) once, in order."""
  from r1jax.rl import rewards

  kept, seen = [], set()
  for ex, text, done in zip(examples, texts, finished):
    score = rewards.score(ex, text, None, "accuracy:1.0,format:1.0")
    if done and score["accuracy"] == 1.0 and score["format"] == 1.0 and (ex.prompt, text) not in seen:
      seen.add((ex.prompt, text))
      kept.append({"prompt": ex.prompt, "completion": text})
  return kept


def stage_model_dir(run_dir: Path, stage: str, cfg: RunConfig | None = None) -> Path:
  """Where a stage's final checkpoint lives (GRPO stages nest the loop's directory under grpo/); with
  grpo.init the base stage is that checkpoint."""
  if stage == "base" and cfg is not None and cfg.grpo.init:
    return Path(cfg.grpo.init)
  return run_dir / stage / "grpo" if stage in ("r1zero", "rl", "final_rl") else run_dir / stage


def check_stages(cfg: RunConfig):
  """Stages that train on grpo.task's generated text cannot run on a problems file."""
  p = cfg.pipeline
  text_stages = ({"cold_start"} if not p.cold_start_data else set()) | ({"base"} if not cfg.grpo.init else set())
  if cfg.data.problems and (bad := [s for s in p.stages if s in text_stages]):
    raise ConfigError(f"pipeline.stages={','.join(p.stages)}: {', '.join(bad)} train on grpo.task's generated "
                      "text, which data.problems has none of; start from grpo.init (the base stage is then that "
                      "checkpoint) and give cold_start its traces (pipeline.cold_start_data=FILE.jsonl)")


def run(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> dict:
  """Run the pipeline's stages in order, then evaluate every trained stage and write the report."""
  cfg = with_init(cfg)
  run_dir, p = Path(run_dir), cfg.pipeline
  stages = list(p.stages)
  check_stages(cfg)
  if {"r1zero", "rl", "final_rl"} & set(stages) or cfg.data.problems:
    check_grpo(cfg)  # before the base stage trains
  rejection_data, teacher_data = run_dir / "rejection" / "data.jsonl", run_dir / "distill" / "teacher.jsonl"
  steps = {"base": p.base_steps, "r1zero": p.r1zero_steps, "cold_start": p.cold_start_steps, "rl": p.rl_steps,
           "sft": p.sft_steps, "final_rl": p.final_rl_steps}
  for i, stage in enumerate(stages):  # the whole stage graph is checked before anything trains
    for need in NEEDS.get(stage, ()):
      done = (rejection_data.exists() if need == "rejection" else need == "base" and bool(cfg.grpo.init)
              or _stage_done(stage_model_dir(run_dir, need), steps[need]))
      if need not in stages[:i] and not done:
        raise ConfigError(f"pipeline.stages={','.join(p.stages)}: stage {stage} needs {need} (finished) before it")
  trained = set()  # stages that trained (or sampled) in this call: whatever was built on them before is stale
  for stage in stages:
    stage_dir = run_dir / stage
    for need in NEEDS.get(stage, ()):
      if need in trained:
        set_aside_stale(stage_dir, need)
    start = stage_model_dir(run_dir, STARTS[stage], cfg) if stage in STARTS else None
    print(f"== stage {stage}" + (f" (from {STARTS[stage]})" if start else ""), flush=True)
    if stage == "base" and cfg.grpo.init:
      print(f"base: grpo.init={cfg.grpo.init}, not trained", flush=True)
      ran = False
    elif stage == "base":
      ran = _sft_stage(cfg, stage_dir, f"rl-direct:{cfg.grpo.task}", p.base_steps, None, resume)
    elif stage == "cold_start":
      ran = _sft_stage(cfg, stage_dir, p.cold_start_data or f"rl:{cfg.grpo.task}", p.cold_start_steps, start,
                       resume, task_examples=p.cold_start_examples)
    elif stage == "sft":
      ran = _sft_stage(cfg, stage_dir, str(rejection_data), p.sft_steps, start, resume)
    elif stage == "distill":
      ran = _sample_once(cfg, stage_model_dir(run_dir, "final_rl"), teacher_data, key_offset=3)
      student = config_lib.load(p.student, [f"mesh.{k}={v}" for k, v in dataclasses.asdict(cfg.mesh).items()])
      student_cfg = dataclasses.replace(cfg, model=student.model, compute=student.compute)
      ran = _sft_stage(student_cfg, stage_dir, str(teacher_data), p.distill_steps, None, resume) or ran
    elif stage == "rejection":
      ran = _sample_once(cfg, stage_model_dir(run_dir, "rl"), rejection_data)
    else:
      ran = _grpo_stage(cfg, stage_dir, steps[stage], start, resume)
    if ran:
      trained.add(stage)
  return write_report(cfg, run_dir, [s for s in stages if s in EVALUATED])


def run_seeds(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, seeds: int = 3) -> dict:
  """The whole pipeline once per seed (train.seed, train.seed + 1, ...: initialisation and every sampling key;
  the problems, their order and the eval split are data.seed's and stay fixed), each in `seed-S/`, then
  every stage's mean, min and max over the seeds as seeds.json and seeds.md."""
  run_dir = Path(run_dir)
  reports, failed = {}, {}
  for seed in range(cfg.train.seed, cfg.train.seed + seeds):
    print(f"==== seed {seed}", flush=True)
    try:
      reports[seed] = run(_with(cfg, train={"seed": seed}), run_dir / f"seed-{seed}", resume=resume)
    except TooFewSamples as e:  # this seed stops; the others still run, and the summary names it
      print(f"seed {seed}: {e}", flush=True)
      failed[seed] = str(e)
  summary = summarize(reports, cfg.pipeline.eval_k) if reports else {"seeds": [], "stages": {}, "kept": {}}
  summary.update(task=rollouts.task_name(cfg), eval_prompts=cfg.pipeline.eval_prompts, failed=failed)
  if jax.process_index() == 0:
    (run_dir / "seeds.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "seeds.md").write_text(seeds_table(summary))
  print(seeds_table(summary), flush=True)
  if failed:
    raise TooFewSamples(f"{len(failed)} of {seeds} seeds stopped at rejection sampling: "
                        + "; ".join(f"seed {s}" for s in failed) + f" (see {run_dir / 'seeds.md'})")
  return summary


def summarize(reports: dict[int, dict], eval_k: int) -> dict:
  """Per stage and metric (accuracy, format, pass@k): every seed's value, their mean, min and max."""
  stages, seeds = {}, list(reports)
  for stage in next(iter(reports.values()))["stages"]:
    rows = [reports[s]["stages"][stage] for s in seeds]
    stages[stage] = {"model": rows[0]["model"]}
    for metric in ("accuracy", "format", f"pass@{eval_k}"):
      values = [r[metric] for r in rows if metric in r]
      if values:
        stages[stage][metric] = {"per_seed": values, "mean": float(np.mean(values)), "min": min(values),
                                 "max": max(values)}
  kept = {name: [reports[s][name]["kept"] for s in seeds if reports[s].get(name)]
          for name in ("rejection", "distill_samples")}
  return {"seeds": seeds, "stages": stages, "kept": kept}


def seeds_table(summary: dict) -> str:
  metrics = [m for m in next(iter(summary["stages"].values()), {}) if m != "model"]
  lines = [f"# R1 pipeline on `{summary['task']}` over seeds {summary['seeds']} ({summary['eval_prompts']} eval "
           "problems; mean [min, max])", "", "| stage | model | " + " | ".join(metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for stage, row in summary["stages"].items():
    cells = [f"{row[m]['mean']:.3f} [{row[m]['min']:.3f}, {row[m]['max']:.3f}]" for m in metrics]
    lines.append(f"| {stage} | {row['model']} | " + " | ".join(cells) + " |")
  for name, what in (("rejection", "rejection sampling kept"), ("distill_samples", "the student's data kept")):
    if summary["kept"].get(name):
      lines.append(f"\nPer seed, {what}: {summary['kept'][name]}.")
  for seed, why in summary.get("failed", {}).items():
    lines.append(f"\nSeed {seed} stopped, not in the table: {why}")
  return "\n".join(lines) + "\n"


def write_report(cfg: RunConfig, run_dir: Path, stages: list[str]) -> dict:
  """Eval accuracy, format rate, mean completion length and pass@k of every stage's final model on the
  eval split, as report.json, report.md and report.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  p = cfg.pipeline
  rows = {}
  for stage in stages:
    stage_cfg = checkpoint.load_config(stage_model_dir(run_dir, stage, cfg))
    stage_cfg = dataclasses.replace(stage_cfg, sampler=cfg.sampler, grpo=cfg.grpo, data=cfg.data, mesh=cfg.mesh)
    mesh = sharding.make_mesh(stage_cfg.mesh)
    with jax.set_mesh(mesh):
      params = checkpoint.load_params(stage_model_dir(run_dir, stage, cfg), stage_cfg, mesh)
      rows[stage] = rollouts.evaluate(params, stage_cfg, p.eval_prompts, p.eval_k)
    rows[stage]["model"] = f"{stage_cfg.model.attention}, {_params(stage_cfg)}"
  rejection, teacher = run_dir / "rejection" / "data_stats.json", run_dir / "distill" / "teacher_stats.json"
  report = {"task": rollouts.task_name(cfg), "stages": rows,
            "rejection": json.loads(rejection.read_text()) if rejection.exists() else None,
            "distill_samples": json.loads(teacher.read_text()) if teacher.exists() else None}
  (run_dir / "report.json").write_text(json.dumps(report, indent=2))
  k = f"pass@{p.eval_k}"
  lines = [f"# R1 pipeline on `{rollouts.task_name(cfg)}` ({p.eval_prompts} eval problems)", "",
           f"| stage | model | accuracy | format | mean length | {k} |", "|---|---|---|---|---|---|"]
  for stage, r in rows.items():
    lines.append(f"| {stage} | {r['model']} | {r['accuracy']:.3f} | {r['format']:.3f} | "
                 f"{r['completion_len_mean']:.1f} | {r.get(k, float('nan')):.3f} |")
  for name, what in (("rejection", "Rejection sampling (rl) kept"), ("distill_samples", "The student's data (final_rl) kept")):
    if report[name]:
      lines += ["", f"{what} {report[name]['kept']} of {report[name]['samples']} samples."]
  (run_dir / "report.md").write_text("\n".join(lines) + "\n")
  fig, ax = plt.subplots(figsize=(7, 3.5))
  x = range(len(rows))
  ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in rows.values()], 0.4, label="accuracy")
  ax.bar([i + 0.2 for i in x], [r["format"] for r in rows.values()], 0.4, label="format")
  ax.set_xticks(list(x), list(rows), rotation=20)
  ax.set(ylim=(0, 1.05), title=f"R1 pipeline on {rollouts.task_name(cfg)}: eval split")
  ax.legend()
  fig.tight_layout()
  fig.savefig(run_dir / "report.png", dpi=100)
  print("\n".join(lines), flush=True)
  return report


def _params(cfg: RunConfig) -> str:
  from r1jax import model

  return f"{model.param_count(cfg.model)['total'] / 1e6:.2f}M params"
