"""Documents read and tokenized in pieces, so that memory is bounded by data.piece_bytes and not
by the longest document.

A piece is at most `piece_bytes` bytes of a document's text. It ends after the last newline in
its second half, else after the last space there, else at the last UTF-8 character boundary, so
a subword tokenizer sees whole lines (or words) and its tokens are those of the whole document
but for the rare merge across a cut; the byte tokenizer's are always identical. A piece is
identified by its cursor (the byte offset where it starts; for prepared shards, the record
index within the document), so an iterator can resume at any piece.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from lmtrain.data.errors import DataError


@dataclasses.dataclass
class Piece:
  cursor: int  # where this piece starts
  next: int  # where the next piece starts
  tokens: np.ndarray  # int32 [n]: the piece's ids, without BOS / EOS
  last: bool  # the document ends with this piece


def _utf8_boundary(chunk: bytes) -> int:
  """The largest cut <= len(chunk) that does not split a UTF-8 character."""
  n = len(chunk)
  for s in range(n - 1, max(n - 4, 0) - 1, -1):
    b = chunk[s]
    if b & 0xC0 != 0x80:  # a character starts at s
      length = next((n for n, lead in ((2, 0b110), (3, 0b1110), (4, 0b11110))
                     if b >> (7 - n) == lead), 1)
      cut = n if s + length <= n else s
      return cut if cut > 0 else n
  return n  # not UTF-8: any cut will do


def cut_point(chunk: bytes) -> int:
  """Where a piece that is not the document's last ends (see the module docstring)."""
  half = len(chunk) // 2
  for sep in (b"\n", b" "):
    i = chunk.rfind(sep, half)
    if i >= 0:
      return i + 1
  return _utf8_boundary(chunk)


class TextDoc:
  """A document of text, tokenized piece by piece. Subclasses give its size and `_read`."""

  size: int

  def __init__(self, tokenizer, piece_bytes: int):
    self.tokenizer = tokenizer
    self.piece_bytes = piece_bytes

  def _read(self, offset: int, n: int) -> bytes:
    raise NotImplementedError

  def pieces(self, cursor: int = 0) -> Iterator[Piece]:
    while True:
      chunk = self._read(cursor, self.piece_bytes)
      last = cursor + len(chunk) >= self.size
      cut = len(chunk) if last else cut_point(chunk)
      yield Piece(cursor, cursor + cut, self.tokenizer.encode(chunk[:cut]), last)
      if last:
        return
      cursor += cut


class BytesDoc(TextDoc):
  """A document held in memory (a JSON line's or a Parquet row's text)."""

  def __init__(self, data: bytes, tokenizer, piece_bytes: int):
    super().__init__(tokenizer, piece_bytes)
    self.data = data
    self.size = len(data)

  def _read(self, offset: int, n: int) -> bytes:
    return self.data[offset:offset + n]


class FileDoc(TextDoc):
  """A whole file as one document, read piece by piece (never whole)."""

  def __init__(self, path: str, tokenizer, piece_bytes: int):
    super().__init__(tokenizer, piece_bytes)
    self.path = path
    try:
      self.size = os.path.getsize(path)
    except OSError as e:
      raise DataError(f"{path}: cannot read ({e.strerror})") from None

  def _read(self, offset: int, n: int) -> bytes:
    try:
      with open(self.path, "rb") as f:
        f.seek(offset)
        return f.read(n)
    except OSError as e:
      raise DataError(f"{self.path}: cannot read ({e.strerror})") from None


class TokenDoc:
  """A prepared document: its pieces are records of token ids (lmtrain.data.shards)."""

  def __init__(self, read_record, first: int, count: int, dtype):
    self._read_record = read_record  # global record index -> bytes
    self.first, self.count, self.dtype = first, count, dtype

  def pieces(self, cursor: int = 0) -> Iterator[Piece]:
    for k in range(cursor, self.count):
      ids = np.frombuffer(self._read_record(self.first + k), self.dtype).astype(np.int32)
      yield Piece(k, k + 1, ids, k + 1 == self.count)
