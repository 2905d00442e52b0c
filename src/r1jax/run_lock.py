"""One writer per run directory: RUN/.lock holds the owner's host, pid and start time while a training
command runs. A second command on the same directory is refused; a lock left by a dead process on this host
is taken over with a message. Only process 0 of a multi-process run takes it, so on a filesystem shared by
several hosts the lock names the host whose process 0 runs; a lock whose owner is on another host cannot be
checked from here and is never taken over (delete the file once that run is gone)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

LOCK = ".lock"


class RunLocked(RuntimeError):
  """Another live process holds the run directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


def _owner(path: Path) -> dict | None:
  try:
    owner = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # half-written by a process killed while taking the lock
    return {"host": socket.gethostname(), "pid": -1, "started": "?"}
  return owner if isinstance(owner, dict) else {"host": socket.gethostname(), "pid": -1, "started": "?"}


def acquire(run_dir: Path) -> Path:
  """Create RUN/.lock for this process, or raise RunLocked naming the owner."""
  run_dir.mkdir(parents=True, exist_ok=True)
  path, host = run_dir / LOCK, socket.gethostname()
  me = json.dumps({"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      owner = _owner(path)
      if owner is None:  # released between our two calls
        continue
      if owner.get("host") != host or (owner.get("pid", -1) > 0 and _alive(owner["pid"])):
        raise RunLocked(f"{run_dir} is in use by pid {owner.get('pid')} on {owner.get('host')} (since "
                        f"{owner.get('started')}); wait for it, or delete {path} if that process is gone") from None
      stale = path.with_name(f"{LOCK}.stale-{os.getpid()}")
      try:
        os.rename(path, stale)  # of several processes taking over, one rename wins
      except FileNotFoundError:
        continue
      stale.unlink()
      print(f"r1jax: {run_dir}: took over the lock of pid {owner.get('pid')} on {host}, which is no longer running",
            flush=True)
      continue
    with os.fdopen(fd, "w") as f:
      f.write(me)
    return path
  raise RunLocked(f"{run_dir}: could not take {path} (it keeps changing hands)")


def release(path: Path):
  owner = _owner(path)
  if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(run_dir: str | Path, enabled: bool = True):
  """The lock for the duration of the block (a no-op when not `enabled`, e.g. on processes other than 0)."""
  if not enabled:
    yield None
    return
  path = acquire(Path(run_dir))
  try:
    yield path
  finally:
    release(path)
