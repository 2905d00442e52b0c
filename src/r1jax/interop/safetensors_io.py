"""Minimal safetensors reading and writing in numpy: lazy, memory-mapped tensors (any dtype, FP8 included,
via ml_dtypes) from single files or index-sharded directories, and sharded writing with an index file.

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw little-endian bytes (github.com/huggingface/safetensors, "Format")."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


def read_header(path: Path) -> tuple[dict, int]:
  """(tensor entries without __metadata__, byte offset of the data section)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class Checkpoint:
  """The tensors of a safetensors file or of a directory of shards; tensors are read lazily by name."""

  def __init__(self, path: str | Path):
    path = Path(path)
    if path.is_dir():
      index = path / INDEX
      if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(f"{path}: no {INDEX} and no *.safetensors files")
      paths = [path / f for f in files]
    else:
      paths = [path]
    self._entries: dict[str, tuple[Path, int, dict]] = {}
    for p in paths:
      header, start = read_header(p)
      for name, entry in header.items():
        if name in self._entries:
          raise ValueError(f"tensor {name} appears in both {self._entries[name][0].name} and {p.name}")
        self._entries[name] = (p, start, entry)
    self._maps: dict[Path, np.memmap] = {}

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][2]["shape"])

  def dtype(self, name: str) -> str:
    return self._entries[name][2]["dtype"]

  def get(self, name: str) -> np.ndarray:
    """A read-only view of one tensor, paged in from disk on access (the OS, not Python, holds the bytes)."""
    path, start, entry = self._entries[name]
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name}: unsupported safetensors dtype {entry['dtype']}")
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    begin, end = entry["data_offsets"]
    raw = self._maps[path][start + begin:start + end]
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_file(path: Path, tensors: dict[str, np.ndarray]):
  """One safetensors file; metadata format "pt" so that transformers accepts it."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, t in tensors.items():
    header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for t in tensors.values():
      f.write(np.ascontiguousarray(t).tobytes())  # numpy on every supported host is little-endian


class ShardWriter:
  """Writes tensors into shards of at most `max_bytes` (one bigger tensor gets its own), then the index."""

  def __init__(self, directory: Path, max_bytes: int):
    self.dir, self.max_bytes = Path(directory), max_bytes
    self.dir.mkdir(parents=True, exist_ok=True)
    self._pending: dict[str, np.ndarray] = {}
    self._files: list[list[str]] = []
    self._total = 0

  def add(self, name: str, t: np.ndarray):
    if self._pending and sum(x.nbytes for x in self._pending.values()) + t.nbytes > self.max_bytes:
      self._flush()
    self._pending[name] = t
    self._total += t.nbytes

  def _flush(self):
    write_file(self.dir / f"shard-{len(self._files):05d}.tmp", self._pending)
    self._files.append(list(self._pending))
    self._pending = {}

  def close(self) -> list[Path]:
    if self._pending or not self._files:
      self._flush()
    n, weight_map, paths = len(self._files), {}, []
    for i, names in enumerate(self._files):
      final = self.dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      (self.dir / f"shard-{i:05d}.tmp").replace(final)
      weight_map.update(dict.fromkeys(names, final.name))
      paths.append(final)
    index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
    (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths
