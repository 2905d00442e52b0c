"""`r1jax` command line. Config errors print one line and exit 2, before anything is compiled."""

from __future__ import annotations

import argparse
import json
import sys

from r1jax import config as config_lib


def _info(args) -> int:
  from r1jax import cost, model

  cfg = config_lib.load(args.config, args.overrides)
  counts = model.param_count(cfg.model)
  flops = cost.train_flops_per_token(counts, cfg.model, cfg.train.seq_len)
  report = {"config": args.config, "params": counts, "train_flops_per_token": flops}
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
  return 0


def _sft(args) -> int:
  from r1jax import demo

  cfg = config_lib.load(args.config, args.overrides)
  return demo.run_sft(cfg)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="r1jax", description="DeepSeek-V3 / R1 in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("info", help="parameter counts and FLOPs of a config")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.add_argument("--json", action="store_true")
  p.set_defaults(fn=_info)
  p = sub.add_parser("sft", help="supervised training of a config on a built-in task")
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.field=value")
  p.set_defaults(fn=_sft)
  args = parser.parse_args(argv)
  try:
    return args.fn(args)
  except config_lib.ConfigError as e:
    print(f"r1jax: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
