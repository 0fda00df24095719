"""JSON lines, streamed and indexed lazily: one document per non-blank line, its text the
`text_field` of the object.

Nothing scans a file at start-up: its units are fixed 1 MiB byte ranges, known from the file's
size alone (a 10 GB file is ready at once, on every host). A unit's documents are the lines that
start inside its range; opening a unit reads that range (and the rest of its last line) to find
them and their content keys. A document is parsed only when it is read, so a malformed line is
found then and reported with its file and line number.
"""
from __future__ import annotations

import hashlib
import json
import os

from lmtrain.data import split as split_lib
from lmtrain.data.errors import DataError
from lmtrain.data.pieces import BytesDoc

CHUNK_BYTES = 1 << 20  # a unit: the lines that start in one such range of a file
_BLOCK = 1 << 20


def line_number(path: str, offset: int) -> int:
  """1-based number of the line starting at byte `offset` (counted only to report an error)."""
  count, done = 1, 0
  with open(path, "rb") as f:
    while done < offset:
      block = f.read(min(_BLOCK * 16, offset - done))
      if not block:
        break
      count += block.count(b"\n")
      done += len(block)
  return count


class _Lines:
  """The lines of one unit that belong to the split: (offset, length) each."""

  def __init__(self, corpus: "JsonlCorpus", ref):
    self.corpus = corpus
    self.path, start, end = ref
    self.lines: list[tuple[int, int]] = []
    self._buffer_start, self._buffer = start, b""
    try:
      self._scan(start, end)
    except OSError as e:
      raise DataError(f"{self.path}: cannot read ({e.strerror})") from None
    self.num_docs = len(self.lines)

  def _scan(self, start: int, end: int) -> None:
    c = self.corpus
    with open(self.path, "rb") as f:
      if start > 0:  # a line starts here only if the byte before is a newline
        f.seek(start - 1)
        data = f.read(end - start + 1)
        first = data.find(b"\n") + 1
        if first == 0:
          return
        data, base = data[first:], start - 1 + first
      else:
        data, base = f.read(end - start), start
      self._buffer_start, self._buffer = base, data
      pos = 0
      while pos < len(data) and base + pos < end:
        nl = data.find(b"\n", pos)
        if nl >= 0:
          head, length, key = data[pos:nl], nl - pos + 1, None
          blank = not head.strip()
        else:  # the last line goes on past the range: hash the rest of it in blocks
          head = data[pos:]
          key, length = self._hash_rest(f, head, base + len(data))
          blank = not head.strip() and length <= len(head) + 1
        if not blank:
          key = key or hashlib.blake2b(head.rstrip(b"\r"), digest_size=16).digest()
          if c.split is None or split_lib.in_split(key, c.split, c.heldout_percent):
            self.lines.append((base + pos, length))
        pos += length

  @staticmethod
  def _hash_rest(f, head: bytes, offset: int) -> tuple[bytes, int]:
    """(content key, length with the newline) of a line whose first bytes are `head` and whose
    rest starts at `offset`; reads in bounded blocks."""
    h = hashlib.blake2b(digest_size=16)
    length = len(head)
    pending = head
    f.seek(offset)
    while True:
      block = f.read(_BLOCK)
      nl = block.find(b"\n")
      if nl >= 0:
        pending += block[:nl]
        length += nl + 1
        break
      if not block:
        break
      length += len(block)
      h.update(pending)
      pending = block
    h.update(pending.rstrip(b"\r"))
    return h.digest(), length

  def _line(self, offset: int, length: int) -> bytes:
    rel = offset - self._buffer_start
    if 0 <= rel and rel + length <= len(self._buffer):
      return self._buffer[rel:rel + length]
    with open(self.path, "rb") as f:
      f.seek(offset)
      return f.read(length)

  def doc(self, i: int) -> BytesDoc:
    offset, length = self.lines[i]
    c = self.corpus
    try:
      record = json.loads(self._line(offset, length))
    except (ValueError, UnicodeDecodeError) as e:
      raise DataError(f"{self.path}:{line_number(self.path, offset)}: malformed JSON line "
                      f"({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict) or c.field not in record:
      have = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{self.path}:{line_number(self.path, offset)}: no field {c.field!r} "
                      f"(data.text_field) in the line (it has {have})")
    text = record[c.field]
    if not isinstance(text, str):
      raise DataError(f"{self.path}:{line_number(self.path, offset)}: field {c.field!r} is a "
                      f"{type(text).__name__}, not text")
    return BytesDoc(text.encode("utf-8", errors="replace"), c.tokenizer, c.piece_bytes)


class JsonlCorpus:
  """JSON lines files as units of CHUNK_BYTES; split by a hash of each line (split None: all)."""

  def __init__(self, paths: list[str], field: str, split: str | None, heldout_percent: float,
               tokenizer, piece_bytes: int):
    self.field, self.split, self.heldout_percent = field, split, heldout_percent
    self.tokenizer, self.piece_bytes = tokenizer, piece_bytes
    self.units = []
    for path in paths:
      size = os.path.getsize(path)
      self.units.extend((path, s, min(s + CHUNK_BYTES, size))
                        for s in range(0, size, CHUNK_BYTES))
    if not self.units:
      raise DataError(f"{', '.join(paths[:3])}: the JSON lines files are empty")

  def open(self, ref) -> _Lines:
    return _Lines(self, ref)

  def unit_bytes(self, ref) -> int:
    return ref[2] - ref[1]
