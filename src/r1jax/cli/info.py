"""`r1jax info` and `r1jax cost`: parameter counts, FLOPs, per-device memory and traffic on a mesh, dollars."""

from __future__ import annotations

import json

from r1jax import config as config_lib
from r1jax.cli.common import parse_mesh
from r1jax.config import RunConfig

# jax and the model are imported after the config loads: a config error prints before jax starts.


def mesh_report(cfg: RunConfig, mesh_text: str | None, batch: int | None, seq: int | None, link_GBps: float,
               lower_step: bool) -> dict:
  """`r1jax info --mesh ... [--lower]`: the mesh defaults to the config's, resolved on this host's devices."""
  import jax

  from r1jax import memory, sharding

  if mesh_text:
    sizes = parse_mesh(mesh_text)
  else:
    sizes = sharding.axis_sizes(cfg.mesh, len(jax.devices()))
  batch, seq = batch or cfg.train.batch_size, seq or cfg.train.seq_len
  out = memory.report(cfg, sizes, batch, seq, link_GBps)
  if lower_step:
    out["lower"] = memory.lower(cfg, sizes, batch, seq)
  return out


def format_mesh_report(r: dict) -> str:
  def gb(n):
    unit = next(u for u in range(4, -1, -1) if n >= 1024**u or u == 0)
    return f"{n / 1024**unit:.2f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"

  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"mesh {mesh} ({r['devices']} devices), global batch {r['batch']} x {r['seq_len']}, "
           f"{r['attention_impl']} attention; per device:"]
  lines += [f"  {k:22s} {gb(v)}" for k, v in r["bytes_per_device"].items()]
  if "all_to_all" in r:
    a = r["all_to_all"]
    lines.append(f"  all-to-all per MoE layer {gb(a['bytes_per_layer'])} ({a['exchanges_per_layer']} exchanges, "
                 f"capacity {a['capacity']}; unpadded {gb(a['unpadded_bytes_per_layer'])}): "
                 f"{a['ms_per_layer']:.2f} ms at {a['link_GBps']:g} GB/s, {a['ms_per_step']:.1f} ms/step "
                 f"over {a['moe_layers']} layers")
  if "context_exchange" in r:
    c = r["context_exchange"]
    lines.append(f"  context all-gather per attention layer {gb(c['bytes_per_layer'])} ({c['exchanges_per_layer']} "
                 f"exchanges of {c['values_per_token']:g} values per token over context={c['context']}): "
                 f"{c['ms_per_layer']:.2f} ms at {c['link_GBps']:g} GB/s, {c['ms_per_step']:.1f} ms/step over "
                 f"{c['attention_layers']} layers")
  if "lower" in r:
    lo = r["lower"]
    lines.append(f"  lowered on {lo['platform']}: {lo['hlo_chars']} chars of StableHLO")
    if lo["memory_analysis"]:
      lines += [f"  XLA {k:28s} {gb(v)}" for k, v in lo["memory_analysis"].items()]
    else:
      lines.append(f"  XLA memory analysis: {lo.get('note', 'not provided by this backend')}")
  return "\n".join(lines)


def info(args) -> int:
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import cost, model
  counts = model.param_count(cfg.model)
  flops = cost.train_flops_per_token(counts, cfg.model, cfg.train.seq_len)
  report = {"config": args.config, "params": counts, "train_flops_per_token": flops}
  if args.mesh or args.lower:
    report["mesh"] = mesh_report(cfg, args.mesh, args.batch, args.seq, args.link_gbps, args.lower)
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
    print(format_mesh_report(report["mesh"]))
  return 0


def cost_command(args) -> int:
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
