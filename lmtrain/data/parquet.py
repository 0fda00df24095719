"""Parquet files: one document per row, its text the `text_field` column; streamed by row
groups (a unit is one row group; only its text column is read, never a whole file).

Start-up reads each file's footer (row groups and schema) and fails in one line when a file has
no such column. Held-out rows are chosen by a hash of their text.
"""
from __future__ import annotations

import hashlib

from lmtrain.data import split as split_lib
from lmtrain.data.errors import DataError
from lmtrain.data.pieces import BytesDoc


def _parquet_file(path: str):
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pyarrow's errors for a file that is not Parquet
    raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


class _RowGroup:
  def __init__(self, corpus: "ParquetCorpus", ref):
    self.path, self.group = ref
    try:
      table = _parquet_file(self.path).read_row_group(self.group, columns=[corpus.field])
    except DataError:
      raise
    except Exception as e:
      raise DataError(f"{self.path}: row group {self.group} cannot be read "
                      f"({str(e).splitlines()[0]})") from None
    self.column = table.column(0).combine_chunks()
    self.corpus = corpus
    rows = range(len(self.column))
    if corpus.split is not None:
      keep = []
      for row, value in zip(rows, self.column.to_pylist()):
        key = hashlib.blake2b((value or "").encode("utf-8", errors="replace"),
                              digest_size=16).digest()
        if split_lib.in_split(key, corpus.split, corpus.heldout_percent):
          keep.append(row)
      rows = keep
    self.rows = list(rows)
    self.num_docs = len(self.rows)

  def doc(self, i: int) -> BytesDoc:
    row = self.rows[i]
    value = self.column[row].as_py()
    if not isinstance(value, str):
      kind = "null" if value is None else type(value).__name__
      raise DataError(f"{self.path}: row group {self.group} row {row}: column "
                      f"{self.corpus.field!r} is {kind}, not text")
    return BytesDoc(value.encode("utf-8", errors="replace"), self.corpus.tokenizer,
                    self.corpus.piece_bytes)


class ParquetCorpus:
  """Parquet files as units of row groups; split by a hash of each row's text (None: all)."""

  def __init__(self, paths: list[str], field: str, split: str | None, heldout_percent: float,
               tokenizer, piece_bytes: int):
    import pyarrow as pa
    self.field, self.split, self.heldout_percent = field, split, heldout_percent
    self.tokenizer, self.piece_bytes = tokenizer, piece_bytes
    self.units, self._bytes = [], {}
    for path in paths:
      meta = _parquet_file(path)
      schema = meta.schema_arrow
      if field not in schema.names:
        raise DataError(f"{path} has no column {field!r} (data.text_field; its columns: "
                        f"{', '.join(schema.names[:8])})")
      kind = schema.field(field).type
      if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} is {kind}, not text")
      for g in range(meta.num_row_groups):
        self.units.append((path, g))
        self._bytes[(path, g)] = meta.metadata.row_group(g).total_byte_size
    if not self.units:
      raise DataError(f"{', '.join(paths[:3])}: the Parquet files have no row groups")

  def open(self, ref) -> _RowGroup:
    return _RowGroup(self, ref)

  def unit_bytes(self, ref) -> int:
    return self._bytes.get(tuple(ref), 0)
