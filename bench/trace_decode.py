"""GPU time per op of the sampler's decode step (bench config, bf16 weights, batch 64, greedy): a jax.profiler
Perfetto trace of one decode chunk (sampler.steps_per_call steps) after a warm-up generate, each kernel joined
to its HLO instruction (output shape, JAX op_name) as bench/trace_ops.py does for the train step, the GPU's
idle time between kernels, and the kernels launched per step.
Usage on a GPU: OUT=dir PYTHONPATH=src python3 bench/trace_decode.py [CONFIG.yaml] [key=value ...]
->  $OUT/trace_decode.json"""
import collections
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from trace_ops import hlo_meta, idle  # noqa: E402

from r1jax import config, model, sampler, sharding  # noqa: E402


def main(args):
  path = next((a for a in args if a.endswith(".yaml")), "configs/bench_gpu.yaml")
  cfg = config.load(path, ["compute.param_dtype=bfloat16", "sampler.temperature=0", "sampler.max_new_tokens=256",
                           *(a for a in args if "=" in a)])
  mcfg, compute, scfg = cfg.model, dataclasses.replace(cfg.compute, capacity_factor=cfg.sampler.capacity_factor), \
      cfg.sampler
  if scfg.fp8_weights:
    compute = dataclasses.replace(compute, fp8=dataclasses.replace(compute.fp8, enabled=True))
  mesh = sharding.make_mesh(cfg.mesh)
  prompts = np.random.default_rng(0).integers(3, mcfg.vocab_size, (64, 64)).tolist()
  with jax.set_mesh(mesh):
    params = model.init(mcfg, dataclasses.replace(compute, fp8=cfg.compute.fp8), jax.random.key(0), mesh)
    if scfg.fp8_weights:
      params = model.fp8_weights(params, compute)
    sampler.generate(params, prompts, mcfg, compute, scfg, eos_id=-1)  # compiles
    buf, lengths, S = sampler.prompt_buffer(prompts, 64, 0, mcfg.max_seq_len, scfg.max_new_tokens)
    rows = sharding.global_batch({"t": buf, "l": lengths, "live": np.ones(64, bool),
                                  "i": np.arange(64, dtype=np.int32),
                                  "b": np.full(64, scfg.max_new_tokens, np.int32)}, mesh)
    eos = jax.numpy.asarray([-1])
    st = sampler.prefill_jit(params, rows["t"], rows["l"], rows["live"], rows["i"], rows["b"], jax.random.key(0),
                             S=S, eos_E=eos, cfg=mcfg, compute=compute, scfg=scfg)
    chunk = sampler.decode_chunk_jit.lower(params, st, eos, np.int32(64), cfg=mcfg, compute=compute,
                                           scfg=scfg).compile()
    st = jax.block_until_ready(chunk(params, st, eos, np.int32(64)))
    d = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
      st = jax.block_until_ready(chunk(params, st, eos, np.int32(64)))
  steps = scfg.steps_per_call
  events = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and "GPU" in e["args"]["name"]}
  kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e),
                   key=lambda e: e["ts"])
  ms, count = collections.Counter(), collections.Counter()
  for e in kernels:
    ms[e["name"]] += e["dur"] / 1e3 / steps
    count[e["name"]] += 1
  meta = hlo_meta(chunk.as_text())
  by_op = collections.Counter()
  for k, t in ms.items():
    op = meta.get(k, ("", ""))[1]
    by_op[op.split("/")[-1] if op else k[:40]] += t
  gaps = idle(kernels, steps)
  out = {"steps": steps, "kernels_per_step": len(kernels) / steps, "busy_ms_per_step": round(sum(ms.values()), 3),
         "span_ms_per_step": gaps["span_ms"], "idle": gaps,
         "top": [{"kernel": k[:60], "ms": round(t, 4), "count": count[k] // steps, "shape": meta.get(k, ("", ""))[0],
                  "op": meta.get(k, ("", ""))[1]} for k, t in ms.most_common(60)],
         "by_op": [{"op": k, "ms": round(t, 4)} for k, t in by_op.most_common(40)]}
  print(f"{out['kernels_per_step']:.0f} kernels/step, busy {out['busy_ms_per_step']} ms, span {gaps['span_ms']} ms, "
        f"idle {gaps['idle_ms']} ms per step")
  for r in out["by_op"][:25]:
    print(f"  {r['ms']:8.3f} {r['op'][:100]}")
  json.dump(out, open(os.path.join(os.environ["OUT"], "trace_decode.json"), "w"), indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
