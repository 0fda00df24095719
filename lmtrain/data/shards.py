"""Prepared shards: a source tokenized once (`python -m lmtrain.prepare`) into ArrayRecord files.

Layout of a prepared directory:
  manifest.json              tokenizer (file hash, ids), source, dtype, per split: shards
                             (file, records, bytes), units, documents, tokens
  <split>/shard-NNNNN.array_record   one record per document piece: its token ids as
                             little-endian `dtype` (uint16 below 65536 ids, else uint32), no
                             BOS/EOS; an empty document is one empty record
  <split>/units.npy          int64 [units, 3]: first document, documents, tokens
  <split>/docs.npy           int64 [documents + 1]: each document's first record (global index
                             over the split's shards in order), then the number of records

Units and documents are the raw source's, in its order, with the same pieces, so a prepared
split yields exactly the batches of the raw one (same seed, same tokenizer).
"""
from __future__ import annotations

import json
import os

import numpy as np

from lmtrain.data.errors import DataError
from lmtrain.data.pieces import TokenDoc

MANIFEST = "manifest.json"
FORMAT = "lmtrain-shards-1"
WRITER_OPTIONS = "group_size:1,uncompressed"  # random access to every record
UNIT_READ_BYTES = 16 << 20  # a unit up to this size is read in one call, larger ones by record


def token_dtype(vocab_size: int):
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise DataError(f"data.path={directory!r} has no {MANIFEST} (make one with python -m "
                    "lmtrain.prepare --config ... --out DIR)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e})") from None
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path} is not an lmtrain shard manifest (format "
                    f"{manifest.get('format')!r}, expected {FORMAT!r})")
  return manifest


def manifest_hash(directory: str) -> str:
  import hashlib
  with open(os.path.join(directory, MANIFEST), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


class _Unit:
  def __init__(self, corpus: "ShardCorpus", u: int):
    first_doc, num_docs, num_tokens = (int(x) for x in corpus.units_table[u])
    self.corpus, self.first_doc, self.num_docs = corpus, first_doc, num_docs
    docs = corpus.docs_table
    self._first = int(docs[first_doc])
    self._records = None
    if num_docs and num_tokens * corpus.dtype.itemsize <= UNIT_READ_BYTES:
      end = int(docs[first_doc + num_docs])
      self._records = corpus.read_records(range(self._first, end))

  def _read(self, index: int) -> bytes:
    if self._records is not None:
      return self._records[index - self._first]
    return self.corpus.read_records([index])[0]

  def doc(self, i: int) -> TokenDoc:
    d = self.first_doc + i
    first, end = int(self.corpus.docs_table[d]), int(self.corpus.docs_table[d + 1])
    return TokenDoc(self._read, first, end - first, self.corpus.dtype)


class ShardCorpus:
  """One split of a prepared directory; units are indices into its units table."""

  def __init__(self, directory: str, split: str):
    self.directory = directory
    self.manifest = read_manifest(directory)
    info = self.manifest["splits"].get(split)
    if info is None:
      raise DataError(f"{directory}: the manifest has no {split!r} split")
    self.dtype = np.dtype(self.manifest["dtype"])
    self.shards = [os.path.join(directory, s["file"]) for s in info["shards"]]
    self.shard_records = [int(s["records"]) for s in info["shards"]]
    self.check_files(info["shards"])
    try:
      self.units_table = np.load(os.path.join(directory, split, "units.npy"), mmap_mode="r")
      self.docs_table = np.load(os.path.join(directory, split, "docs.npy"), mmap_mode="r")
    except (OSError, ValueError) as e:
      raise DataError(f"{directory}/{split}: unreadable index ({e})") from None
    if len(self.units_table) != info["units"] or len(self.docs_table) != info["docs"] + 1:
      raise DataError(f"{directory}/{split}: the index does not match {MANIFEST}")
    self.units = list(range(len(self.units_table)))
    self._ends = np.cumsum(self.shard_records)
    self._source = None

  def check_files(self, shards: list[dict]) -> None:
    """Every shard exists with the size the manifest recorded (a truncated or replaced file
    fails here, in one line, before anything trains)."""
    if not shards:
      raise DataError(f"{self.directory}: the manifest lists no shards")
    for s in shards:
      path = os.path.join(self.directory, s["file"])
      if not os.path.isfile(path):
        raise DataError(f"{path}: shard missing (listed in {MANIFEST})")
      size = os.path.getsize(path)
      if size != s["bytes"]:
        raise DataError(f"{path}: shard is {size} bytes, the manifest says {s['bytes']} "
                        "(truncated or replaced; prepare it again)")

  def verify(self) -> None:
    """Opens every shard and checks its record count (a damaged file fails in one line)."""
    from array_record.python.array_record_module import ArrayRecordReader
    for path, n in zip(self.shards, self.shard_records):
      try:
        reader = ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
      except Exception as e:
        raise DataError(f"{path}: corrupt ArrayRecord shard ({str(e).splitlines()[0]})") from None
      if count != n:
        raise DataError(f"{path}: {count} records, the manifest says {n}")

  def read_records(self, indices) -> list[bytes]:
    indices = list(indices)
    if self._source is None:
      import grain
      self._source = grain.sources.ArrayRecordDataSource(
          [f"{p}[0:{n}]" for p, n in zip(self.shards, self.shard_records)])
    try:
      return list(self._source.__getitems__(indices))
    except Exception as e:
      shard = int(np.searchsorted(self._ends, indices[0], side="right")) if indices else 0
      where = self.shards[min(shard, len(self.shards) - 1)]
      raise DataError(f"{where}: records {indices[0]}..{indices[-1]} unreadable (corrupt "
                      f"shard? {str(e).splitlines()[0]})") from None

  def open(self, u: int) -> _Unit:
    return _Unit(self, int(u))

  def unit_bytes(self, u: int) -> int:
    return int(self.units_table[int(u)][2]) * self.dtype.itemsize


class ShardWriter:
  """Writes one shard of a split: records in unit order, with its unit and document tables
  (relative to the shard; the manifest makes them global)."""

  def __init__(self, path: str, dtype):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.path, self.dtype = path, np.dtype(dtype)
    self._tmp = path + ".tmp"
    self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self.records = 0
    self.units: list[tuple[int, int, int]] = []  # (first doc, docs, tokens), shard-relative
    self.docs: list[int] = []  # first record of each document, shard-relative
    self._unit_docs = self._unit_tokens = 0

  def add_doc(self, pieces) -> int:
    """Writes a document's pieces (token arrays); returns its number of tokens."""
    self.docs.append(self.records)
    tokens = 0
    for ids in pieces:
      self._writer.write(np.asarray(ids).astype(self.dtype).tobytes())
      self.records += 1
      tokens += len(ids)
    self._unit_docs += 1
    self._unit_tokens += tokens
    return tokens

  def end_unit(self) -> None:
    self.units.append((len(self.docs) - self._unit_docs, self._unit_docs, self._unit_tokens))
    self._unit_docs = self._unit_tokens = 0

  def close(self) -> dict:
    """Finishes the file (renamed into place only when complete); returns its tables."""
    self._writer.close()
    os.replace(self._tmp, self.path)
    return {"file": self.path, "records": self.records, "bytes": os.path.getsize(self.path),
            "units": self.units, "docs": self.docs}
