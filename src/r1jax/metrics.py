"""What a training run reports, in its run directory: metrics.jsonl (the record, one line per step), TensorBoard
events under events/, a rich progress bar on stderr, and PNG curves under plots/ drawn from the JSONL.

Only process 0 writes (`Writer(enabled=jax.process_index() == 0)`); the others get a Writer that does nothing."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

JSONL, EVENTS, PLOTS = "metrics.jsonl", "events", "plots"
RESERVED = ("step", "time")
# Drawn on one figure: the total and the terms it is the sum of (train.loss_fn).
LOSS_KEYS = ("loss", "ce", "mtp_loss", "aux_loss")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode(value) -> float | str:
  """A metric as a JSON value: strict JSON has no NaN/Infinity, so those become the strings "nan"/"inf"/"-inf"."""
  value = float(value)
  if math.isfinite(value):
    return value
  return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def decode(value):
  return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def format_line(step: int, metrics: dict, now: float) -> str:
  """One JSONL record (newline included); metric names may not shadow the record's own fields."""
  clash = [k for k in metrics if k in RESERVED]
  if clash:
    raise ValueError(f"metric names {clash} are reserved in {JSONL}; rename them")
  record = {"step": int(step), "time": round(now, 3), **{k: encode(v) for k, v in metrics.items()}}
  return json.dumps(record, allow_nan=False) + "\n"


def parse_line(line: str, where: str) -> dict:
  """One JSONL record, with non-finite strings decoded; errors are `where: reason`."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
    raise ValueError(f"{where}: missing integer \"step\"")
  return {k: decode(v) for k, v in record.items()}


def read_jsonl(path: str | Path) -> list[dict]:
  """All records of a metrics file; blank lines are skipped, a malformed line raises `path:LINE: reason`."""
  path = Path(path)
  with path.open() as f:
    return [parse_line(line, f"{path}:{i}") for i, line in enumerate(f, 1) if line.strip()]


def truncate_after(path: Path, start_step: int) -> int:
  """Keep only records with step <= start_step (those a resumed run will not write again); returns how many
  were dropped. An unterminated last line is the write a killed run was in the middle of, so it goes too."""
  if not path.exists():
    return 0
  text = path.read_text()
  lines = text.splitlines(keepends=True)
  if lines and not lines[-1].endswith("\n"):
    lines.pop()
  kept = [line for i, line in enumerate(lines, 1)
          if line.strip() and parse_line(line, f"{path}:{i}")["step"] <= start_step]
  new = "".join(kept)
  if new != text:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)  # atomic: a crash here leaves the old file or the new one, never half of it
  return sum(1 for line in lines if line.strip()) - len(kept)


def group_keys(keys: list[str]) -> dict[str, list[str]]:
  """Figure name -> metric keys drawn on it: the loss terms together, every other metric alone."""
  groups = {"loss": [k for k in LOSS_KEYS if k in keys]} if any(k in LOSS_KEYS for k in keys) else {}
  groups.update({k: [k] for k in keys if k not in LOSS_KEYS})
  return groups


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, leaving out steps where it is missing, non-numeric or non-finite."""
  points = [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
  return [s for s, _ in points], [v for _, v in points]


def plot_curves(jsonl_path: str | Path, out_dir: str | Path, keys: list[str] | None = None) -> list[Path]:
  """One PNG per figure of group_keys (x = step) in out_dir/plots/; `keys` limits which metrics are drawn.
  Figures are drawn on an Agg canvas directly, so pyplot's global backend (a notebook's) is left alone."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = read_jsonl(jsonl_path)
  present = list(dict.fromkeys(k for r in records for k in r if k not in RESERVED))
  if keys is not None:
    present = [k for k in present if k in keys]
  plot_dir = Path(out_dir) / PLOTS
  paths = []
  for name, group in group_keys(present).items():
    lines = {k: series(records, k) for k in group}
    lines = {k: xy for k, xy in lines.items() if xy[0]}
    if not lines:
      continue
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, (steps, values) in lines.items():
      ax.plot(steps, values, label=k, marker="." if len(steps) < 50 else None, linewidth=1.2)
    ax.set(xlabel="step", title=name)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
      ax.legend()
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / (re.sub(r"[^\w.-]+", "_", name) + ".png")
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths


def plot_run(run_dir: str | Path) -> list[Path]:
  """The CLI's `plot` hook: curves of run_dir/metrics.jsonl into run_dir/plots/."""
  path = Path(run_dir) / JSONL
  if not path.exists():
    raise FileNotFoundError(f"{path} not found; is {run_dir} a training run directory?")
  return plot_curves(path, run_dir)


class Writer:
  """Writes each step's metrics to metrics.jsonl, TensorBoard and the progress bar; plots on close.

  Resuming (start_step > 0) appends to metrics.jsonl after first dropping the records with step > start_step,
  which a run that died after its last checkpoint wrote and this run writes again, so each step appears once
  (start_step 0 therefore starts the file afresh). TensorBoard gets the same purge via purge_step."""

  def __init__(self, run_dir: str | Path, *, enabled: bool = True, total_steps: int, start_step: int = 0,
               tokens_key: str = "tokens"):
    self.enabled, self.run_dir, self.tokens_key = enabled, Path(run_dir), tokens_key
    self._closed = not enabled
    if not enabled:
      return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from tensorboardX import SummaryWriter

    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = self.run_dir / JSONL
    self.dropped = truncate_after(self.jsonl_path, start_step)
    self._jsonl = self.jsonl_path.open("a")
    self._tb = SummaryWriter(str(self.run_dir / EVENTS), purge_step=start_step + 1 if start_step else None,
                             flush_secs=30)
    self._start_time, self._tokens = time.monotonic(), 0.0
    self._progress = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True))
    self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")
    self._progress.start()
    if self.dropped:
      self.log_line(f"resuming after step {start_step}: dropped {self.dropped} later records from {self.jsonl_path}")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Append one step (flushed, so a killed run keeps it), add its scalars to TensorBoard, move the bar."""
    if self._closed:
      return
    self._jsonl.write(format_line(step, metrics, time.time()))
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), global_step=int(step))
    self._tokens += float(metrics.get(self.tokens_key, 0.0))
    elapsed = time.monotonic() - self._start_time
    loss = f"{float(metrics['loss']):.4f}" if "loss" in metrics else "-"
    tps = f"{self._tokens / elapsed:,.0f}" if self._tokens and elapsed > 0 else "-"
    self._progress.update(self._task, completed=int(step), loss=loss, tps=tps)

  def log_line(self, text: str) -> None:
    """Print above the progress bar (a plain print would tear it); text is not parsed as rich markup."""
    if not self._closed:
      self._progress.console.print(text, markup=False, highlight=False)

  def plot(self) -> list[Path]:
    if not self.enabled:
      return []
    if not self._closed:
      self._jsonl.flush()
    return plot_curves(self.jsonl_path, self.run_dir)

  def close(self) -> None:
    """Flush TensorBoard, stop the bar, draw the curves; closing twice is harmless."""
    if self._closed:
      return
    self._closed = True
    self._jsonl.close()
    self._tb.close()
    self._progress.stop()
    self.plot()

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
