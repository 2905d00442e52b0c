"""GPU time per op of the bench-config train step (n_mtp 0, bf16 params), FP8 off and/or on: a jax.profiler
Perfetto trace of 2 steps after 3 warm-up, each kernel joined to the compiled HLO instruction of the same
name (output shape, JAX op_name), so every fusion is attributed to the code that made it; and the GPU's idle
time between kernels, charged to the kernel each gap ends before.
Usage on a GPU: OUT=dir PYTHONPATH=src python3 bench/trace_ops.py [off] [on] [key=value ...]  ->  $OUT/trace_ops.json"""
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

from r1jax import config, sharding, train
from r1jax.bench.batches import train_batch


def hlo_meta(hlo: str) -> dict:
  """Instruction name (as the kernel is named: '.' and '-' become '_') -> (output shape, op_name)."""
  meta = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      meta[re.sub(r"[.\-]", "_", m.group(1))] = (m.group(2)[:80], op.group(1)[-160:] if op else "")
  return meta


def profile(cfg, steps: int = 2) -> tuple[dict, dict, str]:
  """Per-kernel GPU ms per step over `steps` traced steps, the idle gaps (idle) and the compiled HLO text."""
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    b = train_batch(cfg)
    b = jax.device_put(b, train.batch_shardings(b, mesh))
    step = train.jit_sft_step(state, b, mesh).lower(state, b).compile()
    for _ in range(3):
      state, _ = step(state, b)
    jax.block_until_ready(state)
    d = tempfile.mkdtemp(prefix="trace_")  # one per profile: glob below must not find an earlier mode's
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        state, _ = step(state, b)
      jax.block_until_ready(state)
  events = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in e["args"]["name"]}
  ms, count = collections.Counter(), collections.Counter()
  kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e),
                   key=lambda e: e["ts"])
  for e in kernels:
    ms[e["name"]] += e["dur"] / 1e3 / steps
    count[e["name"]] += 1
  return {k: (ms[k], count[k] // steps) for k in ms}, idle(kernels, steps), step.as_text()


def idle(kernels: list, steps: int) -> dict:
  """GPU idle time per step: the gaps where no kernel of any stream runs, between the first kernel and the
  last, each charged to the kernel that ends it (which kernel the GPU was waiting for, not why)."""
  gaps, end = collections.Counter(), None
  for e in kernels:
    if end is not None and e["ts"] > end:
      gaps[e["name"][:60]] += (e["ts"] - end) / 1e3 / steps
    end = max(end or 0, e["ts"] + e["dur"])
  span = (end - kernels[0]["ts"]) / 1e3 / steps if kernels else 0.0
  return {"span_ms": round(span, 2), "idle_ms": round(sum(gaps.values()), 2),
          "idle_before": [{"kernel": k, "ms": round(v, 3)} for k, v in gaps.most_common(25)]}


def main(args):
  modes = [a for a in args if "=" not in a] or ["off", "on"]
  base = config.load("configs/bench_gpu.yaml", ["model.n_mtp=0", "compute.param_dtype=bfloat16",
                                                *(a for a in args if "=" in a)])
  out = {}
  for mode in modes:
    fp8 = dataclasses.replace(base.compute.fp8, enabled=mode == "on")
    cfg = dataclasses.replace(base, compute=dataclasses.replace(base.compute, fp8=fp8)).validate()
    kernels, gaps, hlo = profile(cfg)
    meta = hlo_meta(hlo)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:120]
    rows = [{"kernel": k[:60], "ms": round(t, 3), "count": n, "shape": meta.get(k, ("", ""))[0],
             "op": meta.get(k, ("", ""))[1]} for k, (t, n) in top]
    out[mode] = {"total_ms": round(sum(t for t, _ in kernels.values()), 2), "top": rows, "idle": gaps}
    print(mode, out[mode]["total_ms"], "ms per step;", gaps["idle_ms"], "ms idle in", gaps["span_ms"], flush=True)
    for r in gaps["idle_before"][:10]:
      print(f"  idle {r['ms']:8.3f} before {r['kernel']}")
    for r in rows[:25]:
      print(f"  {r['ms']:8.2f} x{r['count']:<4} {r['kernel'][:40]:40} {r['shape'][:40]}")
  json.dump(out, open(os.path.join(os.environ["OUT"], "trace_ops.json"), "w"), indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
