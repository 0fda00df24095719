"""Document sources: random-access sequences of documents (bytes) for grain.MapDataset.source.

Each source has a stable key per document; the train / held-out split is a hash of that key, so
it is the same on every host and every run.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
import zlib
from typing import Sequence

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def is_heldout(key: str, heldout_percent: int) -> bool:
  return zlib.crc32(key.encode("utf-8")) % 100 < heldout_percent


@dataclasses.dataclass(frozen=True)
class FileDocuments:
  """Each file is one document; keys are paths relative to `root`."""
  paths: tuple[str, ...]
  root: str

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> bytes:
    with open(self.paths[index], "rb") as f:
      return f.read()

  def keys(self) -> list[str]:
    return [os.path.relpath(p, self.root) for p in self.paths]

  def subset(self, keep: Sequence[bool]) -> "FileDocuments":
    return FileDocuments(tuple(p for p, k in zip(self.paths, keep) if k), self.root)


@dataclasses.dataclass(frozen=True)
class JsonlDocuments:
  """One document per JSON line, read at its byte offset; the text is `field` of the object."""
  entries: tuple[tuple[str, int], ...]  # (path, byte offset of the line)
  field: str

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> bytes:
    path, offset = self.entries[index]
    with open(path, "rb") as f:
      f.seek(offset)
      record = json.loads(f.readline())
    if self.field not in record:
      raise KeyError(f"{path} at byte {offset}: no field {self.field!r} in {sorted(record)}")
    return str(record[self.field]).encode("utf-8")

  def keys(self) -> list[str]:
    return [f"{p}:{o}" for p, o in self.entries]

  def subset(self, keep: Sequence[bool]) -> "JsonlDocuments":
    return JsonlDocuments(tuple(e for e, k in zip(self.entries, keep) if k), self.field)


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_documents() -> FileDocuments:
  """The running interpreter's standard library sources (*.py), without its tests."""
  root = stdlib_root()
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  paths = [p for p in paths if os.path.getsize(p) > 0]
  if not paths:
    raise FileNotFoundError(f"no .py files under the standard library at {root}")
  return FileDocuments(tuple(paths), root)


def _expand(path: str, suffixes: tuple[str, ...]) -> list[str]:
  if os.path.isdir(path):
    found = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffixes)]
  else:
    found = glob.glob(path)
  found = sorted(p for p in found if os.path.isfile(p))
  if not found:
    raise FileNotFoundError(f"data path {path!r} matches no {'/'.join(suffixes)} file")
  return found


def text_documents(path: str) -> FileDocuments:
  """A text file, a directory of *.txt files, or a glob: one document per file."""
  files = _expand(path, (".txt",))
  root = path if os.path.isdir(path) else os.path.dirname(files[0])
  return FileDocuments(tuple(files), root)


def jsonl_documents(path: str, field: str = "text") -> JsonlDocuments:
  """A JSON-lines file, a directory of *.jsonl files, or a glob: one document per line."""
  entries = []
  for file in _expand(path, (".jsonl", ".json")):
    offset = 0
    with open(file, "rb") as f:
      for line in f:
        if line.strip():
          entries.append((file, offset))
        offset += len(line)
  return JsonlDocuments(tuple(entries), field)


def _read_source(source: str, path: str | None, field: str):
  if source == "stdlib":
    return stdlib_documents()
  if source == "text":
    return text_documents(path)
  if source == "jsonl":
    return jsonl_documents(path, field)
  raise ValueError(f"data.source={source!r} is not supported")


def load_documents(data_cfg, split: str):
  """The documents of `split` ("train" or "heldout") for the data config.

  With data.eval_path the held-out documents are that path's; otherwise a hash of each
  document's key puts data.heldout_percent of them in the held-out split.
  """
  if data_cfg.eval_path:
    path = data_cfg.eval_path if split == "heldout" else data_cfg.path
    return _read_source(data_cfg.source, path, data_cfg.text_field)
  docs = _read_source(data_cfg.source, data_cfg.path, data_cfg.text_field)
  heldout = [is_heldout(k, data_cfg.heldout_percent) for k in docs.keys()]
  out = docs.subset(heldout if split == "heldout" else [not h for h in heldout])
  if len(out) == 0:
    raise ValueError(f"data split {split!r} of data.source={data_cfg.source!r} is empty "
                     f"(data.heldout_percent={data_cfg.heldout_percent})")
  return out
