"""Per-op GPU time of the bench-config train step, FP8 off/on: perfetto kernel events joined to the compiled
HLO's fusion metadata (op_name, source line), so each fusion is attributed to the JAX code that made it."""
import collections, dataclasses, glob, gzip, json, os, re, sys, jax
from r1jax import config, bench, train, sharding
out = os.environ["OUT"]
modes = sys.argv[1:] or ["off", "on"]
cfg = config.load("configs/bench_gpu.yaml", ["model.n_mtp=0", "model.param_dtype=bfloat16"])
res = {}
for name in modes:
  enabled = name != "off"
  c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8=dataclasses.replace(cfg.model.fp8, enabled=enabled))).validate()
  mesh = sharding.make_mesh(c.mesh)
  b = bench.train_batch(c)
  with jax.set_mesh(mesh):
    state = train.init_state(c, jax.random.key(0), mesh)
    b = jax.device_put(b, train.batch_shardings(b, mesh))
    step = train.jit_sft_step(state, b, mesh).lower(state, b).compile()
    hlo = step.as_text()
    for _ in range(3):
      state, m = step(state, b)
    jax.block_until_ready(state)
    d = f"/tmp/trace_{name}"
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(2):
        state, m = step(state, b)
      jax.block_until_ready(state)
  meta = {}
  for line in hlo.splitlines():
    mt = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?(?:op_name=\"([^\"]*)\")?.*?(?:source_line=(\d+))?", line)
    if mt:
      opn = re.search(r'op_name="([^"]*)"', line); sl = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
      meta[mt.group(1).replace(".", "_").replace("-", "_")] = (mt.group(2)[:80], opn.group(1)[-160:] if opn else "",
                                                                f"{os.path.basename(sl.group(1))}:{sl.group(2)}" if sl else "")
  f = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
  ev = json.load(gzip.open(f))
  ev = ev["traceEvents"] if isinstance(ev, dict) else ev
  pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = [e for e in ev if e.get("ph") == "X" and "GPU" in pids.get(e.get("pid"), "") and "dur" in e]
  per = collections.Counter(); n = collections.Counter()
  for e in gpu:
    per[e["name"]] += e["dur"] / 2e3; n[e["name"]] += 1
  rows = []
  for k, ms in per.most_common(120):
    key = re.sub(r"^(.*?)(_\d+)?$", r"\1\2", k)
    m = meta.get(key) or meta.get(k.replace(".", "_")) or ("", "", "")
    rows.append({"kernel": k[:60], "ms": round(ms, 3), "count": n[k] // 2, "shape": m[0], "op": m[1], "src": m[2]})
  bysrc = collections.Counter()
  for r in rows: bysrc[r["src"] or r["kernel"][:30]] += r["ms"]
  res[name] = {"total_ms": round(sum(per.values()), 2), "top": rows, "by_source": bysrc.most_common(40)}
  print(name, res[name]["total_ms"], flush=True)
  for s, ms in res[name]["by_source"][:25]: print(f"  {ms:8.2f} {s}")
json.dump(res, open(f"{out}/trace_ops.json", "w"), indent=1)
