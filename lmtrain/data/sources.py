"""Document sources as corpora of units: the embedded corpus (the running interpreter's standard
library), text files, JSON lines, Parquet, and prepared ArrayRecord shards.

A corpus is one split ("train" or "heldout") of a source. It is a list of units, known at
start-up without reading the data (a file; a 1 MiB range of a JSON lines file; a Parquet row
group; a prepared unit), and each unit, when opened, is a list of documents:

  corpus.units: list            picklable unit references, in a fixed order
  corpus.open(ref) -> unit      unit.num_docs; unit.doc(i) -> a document with pieces(cursor)
  corpus.unit_bytes(ref) -> int the unit's size in the source (for prepare's progress)

Units are what is shuffled per epoch and sharded over hosts; documents are shuffled within a
unit; documents are read in pieces (lmtrain.data.pieces). A bad record raises DataError naming
its file and line (or row, or record).
"""
from __future__ import annotations

import glob
import os
import sysconfig

from lmtrain.data import split as split_lib
from lmtrain.data.errors import DataError
from lmtrain.data.pieces import FileDoc

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
RAW_SOURCES = ("stdlib", "text", "jsonl", "parquet")
SUFFIXES = {"text": (".txt",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


class _OneDoc:
  num_docs = 1

  def __init__(self, doc):
    self._doc = doc

  def doc(self, i: int):
    del i
    return self._doc


class FileCorpus:
  """Each file is one document and one unit; units are sorted by their key."""

  def __init__(self, files: list[tuple[str, str]], tokenizer, piece_bytes: int):
    self.files = files  # (key, absolute path), sorted by key
    self.units = [path for _, path in files]
    self.tokenizer, self.piece_bytes = tokenizer, piece_bytes

  def open(self, ref: str):
    return _OneDoc(FileDoc(ref, self.tokenizer, self.piece_bytes))

  def unit_bytes(self, ref: str) -> int:
    return os.path.getsize(ref)


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[tuple[str, str]]:
  """(relative path, path) of the standard library's non-empty *.py sources, without tests."""
  root = os.path.realpath(stdlib_root())
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if name.endswith(".py") and os.path.getsize(path) > 0:
        out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
  if not out:
    raise DataError(f"no .py files under the standard library at {root}")
  return sorted(out)


def expand(path: str, suffixes: tuple[str, ...], name: str = "data.path") -> list[tuple[str, str]]:
  """(key, real path) of the files a path names: a file, a directory (searched recursively for
  the suffixes) or a glob. Keys are relative to the dataset root (the directory, or the common
  directory of the files), so they do not depend on how the path was spelled."""
  if os.path.isdir(path):
    root = os.path.realpath(path)
    found = [os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True) for f in fs
             if f.endswith(suffixes)]
  else:
    found = glob.glob(path) if glob.has_magic(path) else [path]
    root = None
  found = [os.path.realpath(p) for p in found if os.path.isfile(p)]
  if not found:
    what = "/".join(suffixes) if os.path.isdir(path) or glob.has_magic(path) else "readable"
    raise DataError(f"{name}={path!r} matches no {what} file")
  if root is None:
    root = os.path.commonpath([os.path.dirname(p) for p in found])
  keyed = {os.path.relpath(p, root).replace(os.sep, "/"): p for p in found}
  return sorted(keyed.items())


def file_corpus(files, split: str | None, heldout_percent: float, tokenizer, piece_bytes,
                family_dirs=()) -> FileCorpus:
  """The files of `split` (None: all of them), by the hash of each file's family."""
  if split is not None:
    files = [(k, p) for k, p in files
             if split_lib.in_split(split_lib.family(k, family_dirs), split, heldout_percent)]
  return FileCorpus(files, tokenizer, piece_bytes)


def raw_corpus(data_cfg, split: str, tokenizer):
  """The corpus of `split` of a raw (not prepared) source. With data.eval_path the held-out
  split is that path's documents and the training split all of data.path's; otherwise each
  document's key puts data.heldout_percent of them in the held-out split."""
  from lmtrain.data import jsonl, parquet
  source, piece = data_cfg.source, data_cfg.piece_bytes
  which = split
  path = data_cfg.path
  if data_cfg.get("eval_path"):
    which = None
    path = data_cfg.eval_path if split == "heldout" else data_cfg.path
  name = "data.eval_path" if which is None and split == "heldout" else "data.path"
  pct = data_cfg.heldout_percent
  if source == "stdlib":
    return file_corpus(stdlib_files(), which, pct, tokenizer, piece,
                       split_lib.STDLIB_FAMILY_DIRS)
  files = expand(path, SUFFIXES.get(source, ()), name)
  if source == "text":
    return file_corpus(files, which, pct, tokenizer, piece)
  if source == "jsonl":
    return jsonl.JsonlCorpus([p for _, p in files], data_cfg.text_field, which, pct, tokenizer,
                             piece)
  if source == "parquet":
    return parquet.ParquetCorpus([p for _, p in files], data_cfg.text_field, which, pct,
                                 tokenizer, piece)
  raise DataError(f"data.source={source!r} has no documents")


def open_corpus(data_cfg, split: str, tokenizer=None):
  """The corpus of `split` ("train" or "heldout") for a data config (raw or prepared)."""
  from lmtrain.data.tokenizers import get_tokenizer
  if split not in split_lib.SPLITS:
    raise ValueError(f"split {split!r} is not one of {', '.join(split_lib.SPLITS)}")
  tokenizer = tokenizer or get_tokenizer(data_cfg.tokenizer)
  if data_cfg.source == "arrayrecord":
    from lmtrain.data import shards
    return shards.ShardCorpus(data_cfg.path, split)
  return raw_corpus(data_cfg, split, tokenizer)
