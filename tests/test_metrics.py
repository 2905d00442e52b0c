"""metrics.Writer and its files: strict JSONL with non-finite values, resume truncation, TensorBoard records
read back from the raw event file, PNG curves. No jax needed."""

import json
import math
import struct

import pytest

from r1jax import metrics


def run(run_dir, steps, start_step=0, total_steps=10, **extra):
  """A Writer over `steps`; loss falls with the step so curves have something to show."""
  with metrics.Writer(run_dir, total_steps=total_steps, start_step=start_step) as w:
    for s in steps:
      w.write(s, {"loss": 2.0 / s, "ce": 1.5 / s, "tokens": 64.0, **extra})
  return run_dir / metrics.JSONL


def read_events(events_dir):
  """(tag, step, value) of every scalar, and every session-log status step, from the TFRecord event files.
  tensorboard's EventAccumulator is not installed, so records are framed here and checked by their CRCs."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  scalars, session_steps = [], []
  for path in sorted(events_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
      record = data[pos + 12:pos + 12 + length]
      (record_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert header_crc == masked_crc32c(header) and record_crc == masked_crc32c(record)
      pos += 16 + length
      event = event_pb2.Event.FromString(record)
      if event.HasField("session_log"):
        session_steps.append((event.session_log.status, event.step))
      scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return scalars, session_steps


def test_jsonl_round_trip_with_non_finite_values(tmp_path):
  path = run(tmp_path, [1, 2], nan=math.nan, pinf=math.inf, ninf=-math.inf)
  for line in path.read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
  records = metrics.read_jsonl(path)
  assert [r["step"] for r in records] == [1, 2]
  assert records[1]["loss"] == 1.0 and records[1]["tokens"] == 64.0 and records[1]["time"] > 1e9
  assert math.isnan(records[0]["nan"]) and records[0]["pinf"] == math.inf and records[0]["ninf"] == -math.inf


def test_resume_drops_steps_after_start_step(tmp_path):
  path = run(tmp_path, [1, 2, 3, 4, 5])
  with path.open("a") as f:
    f.write('{"step": 6, "lo')  # the line a killed run was writing
  run(tmp_path, [4, 5, 6], start_step=3)
  steps = [r["step"] for r in metrics.read_jsonl(path)]
  assert steps == [1, 2, 3, 4, 5, 6]
  run(tmp_path, [1], start_step=0)  # a fresh run in the same directory starts the file afresh
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1]


@pytest.mark.parametrize("bad, reason", [('{"step": 2, "loss": ', "invalid JSON"), ("[1, 2]", "JSON object"),
                                         ('{"loss": 1.0}', '"step"')])
def test_malformed_line_names_file_and_line(tmp_path, bad, reason):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n' + bad + "\n")
  with pytest.raises(ValueError, match=f"^{path}:2: .*{reason}") as e:
    metrics.read_jsonl(path)
  assert "\n" not in str(e.value)


def test_tensorboard_events_read_back(tmp_path):
  run(tmp_path, [1, 2, 3])
  scalars, _ = read_events(tmp_path / metrics.EVENTS)
  assert sorted((t, s) for t, s, _ in scalars) == sorted((t, s) for t in ("loss", "ce", "tokens") for s in (1, 2, 3))
  assert {(t, s): v for t, s, v in scalars}[("loss", 2)] == pytest.approx(1.0)
  run(tmp_path, [3, 4], start_step=2)
  _, session_steps = read_events(tmp_path / metrics.EVENTS)
  assert (1, 3) in session_steps  # SessionLog.START at step 3: TensorBoard drops the dead run's step 3


def test_plots_are_valid_pngs(tmp_path):
  from matplotlib.image import imread

  run(tmp_path, [1, 2, 3, 4], grad_norm=0.5, all_nan=math.nan)
  paths = sorted(p.name for p in (tmp_path / metrics.PLOTS).glob("*.png"))  # written by close()
  assert paths == ["grad_norm.png", "loss.png", "tokens.png"]  # all_nan has nothing to draw
  for path in metrics.plot_run(tmp_path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert height > 100 and width > 100
  assert [p.name for p in metrics.plot_curves(tmp_path / metrics.JSONL, tmp_path / "x", keys=["ce"])] == ["loss.png"]


def test_disabled_writer_creates_nothing(tmp_path):
  run_dir = tmp_path / "run"
  with metrics.Writer(run_dir, enabled=False, total_steps=3) as w:
    w.write(1, {"loss": 1.0})
    w.log_line("hello")
    assert w.plot() == []
  assert not run_dir.exists()


def test_plot_run_without_metrics_says_why(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
    metrics.plot_run(tmp_path)


def test_reserved_metric_name_rejected(tmp_path):
  with metrics.Writer(tmp_path, total_steps=1) as w, pytest.raises(ValueError, match="reserved"):
    w.write(1, {"time": 1.0})
