"""A streaming packer: documents, read piece by piece, packed into rows of seq_len next-token
pairs with segment ids, as a grain IterDataset whose state resumes exactly.

A row is a dict of int32 [seq_len] arrays (the batch keys, lmtrain.data.pipeline.BATCH_KEYS):
tokens (inputs), targets (the next token), segment_ids (1, 2, ... per document piece in the row;
0 = padding), positions (within the piece), loss_mask (1 where the target is scored).

A document is BOS + its ids + EOS; its pairs fill the row and a document that does not fit goes
on in the next row (a new segment whose positions restart at 0): no token is dropped. With
`align` = N > 0 every document starts at a multiple of N within its row (the gap is padding),
so block patterns (MoBA, block-sparse sinks) line up with document starts.

Order: the units of this host (every process_count-th from process_index) in a new seeded
permutation every epoch, the documents of a unit in a seeded permutation; seed None keeps the
source order. Memory: one unit's index and one piece (data.piece_bytes of text) at a time.

State (JSON): epoch, unit (position in the epoch's order), doc (position in the unit's order),
cursor (the current piece), offset (pairs of it already emitted), carry (the token before the
piece), skipped (bad records skipped so far).
"""
from __future__ import annotations

import sys

import grain
import numpy as np

from lmtrain.data.errors import DataError

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
_LOG_SKIPS = 10  # bad records logged one by one; after that at powers of ten


class PackedRows(grain.IterDataset):
  """Rows of packed documents from a corpus (lmtrain.data.sources)."""

  def __init__(self, corpus, *, seq_len: int, bos_id: int, eos_id: int, seed: int | None,
               align: int = 0, repeat: bool = True, skip_bad_records: bool = False,
               process_index: int = 0, process_count: int = 1):
    super().__init__()
    self.corpus = corpus
    self.units = corpus.units[process_index::process_count]
    if not self.units:
      raise DataError(f"process {process_index} of {process_count} has no data: the split has "
                      f"{len(corpus.units)} unit(s) (files, 1 MiB ranges, row groups) for "
                      f"{process_count} processes")
    self.seq_len, self.bos_id, self.eos_id = seq_len, bos_id, eos_id
    self.seed, self.align, self.repeat, self.skip = seed, align, repeat, skip_bad_records

  def __iter__(self):
    return _PackIterator(self)


class _PackIterator(grain.DatasetIterator):

  def __init__(self, ds: PackedRows):
    super().__init__()
    self.ds = ds
    self._set({"epoch": 0, "unit": 0, "doc": 0, "cursor": 0, "offset": 0, "carry": ds.bos_id,
                "skipped": 0})

  # -- state ----------------------------------------------------------------------------------

  def _set(self, state: dict) -> None:
    self.epoch, self.unit, self.doc = state["epoch"], state["unit"], state["doc"]
    self.cursor, self.offset, self.carry = state["cursor"], state["offset"], state["carry"]
    self.skipped = state["skipped"]
    self._order = self._unit_obj = self._doc_order = self._pieces = self._pairs = None
    self._produced = True  # unknown for a restored epoch: assume it has data

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "unit": self.unit, "doc": self.doc, "cursor": self.cursor,
            "offset": self.offset, "carry": self.carry, "skipped": self.skipped}

  def set_state(self, state: dict) -> None:
    self._set({k: int(v) for k, v in state.items()})

  # -- reading --------------------------------------------------------------------------------

  def _epoch_order(self) -> np.ndarray:
    if self._order is None:
      n = len(self.ds.units)
      self._order = (np.arange(n) if self.ds.seed is None else
                     np.random.default_rng([self.ds.seed, self.epoch]).permutation(n))
    return self._order

  def _open_unit(self) -> bool:
    """Opens the unit at self.unit, going to the next epoch at the end of one; False at the
    end of the data (repeat=False)."""
    while self._unit_obj is None:
      order = self._epoch_order()
      if self.unit >= len(order):
        if not self.ds.repeat:
          return False
        if not self._produced:
          raise DataError(f"the data has no documents in an epoch of {len(order)} unit(s)")
        self.epoch, self.unit, self.doc = self.epoch + 1, 0, 0
        self._order, self._produced = None, False
        continue
      index = int(order[self.unit])
      unit = self.ds.corpus.open(self.ds.units[index])
      if unit.num_docs == 0:
        self.unit, self.doc = self.unit + 1, 0
        continue
      self._unit_obj = unit
      self._doc_order = (np.arange(unit.num_docs) if self.ds.seed is None else
                         np.random.default_rng([self.ds.seed, self.epoch, index]).permutation(
                             unit.num_docs))
    return True

  def _next_doc(self) -> None:
    self.doc, self.cursor, self.offset, self.carry = self.doc + 1, 0, 0, self.ds.bos_id
    self._pieces = None

  def _skip(self, error: DataError) -> None:
    if not self.ds.skip:
      raise error
    self.skipped += 1
    n = self.skipped
    if n <= _LOG_SKIPS or str(n).strip("0") == "1":
      print(f"lmtrain: warning: skipped a bad record ({n} so far; data.skip_bad_records): "
            f"{error}", file=sys.stderr, flush=True)
    self._next_doc()

  def _load(self) -> bool:
    """Makes self._pairs the (inputs, targets) of the current piece with pairs left to emit;
    False at the end of the data."""
    while self._pairs is None or self.offset >= len(self._pairs[0]):
      if self._pairs is not None:  # the piece is used up: on to the next piece or document
        piece = self._piece
        self._pairs = None
        if piece.last:
          self._next_doc()
        else:
          if len(piece.tokens):
            self.carry = int(piece.tokens[-1])
          self.cursor, self.offset = piece.next, 0
      if not self._open_unit():
        return False
      if self.doc >= self._unit_obj.num_docs:
        self.unit, self.doc, self._unit_obj, self._pieces = self.unit + 1, 0, None, None
        continue
      try:
        if self._pieces is None:
          doc = self._unit_obj.doc(int(self._doc_order[self.doc]))
          self._pieces = doc.pieces(self.cursor)
        piece = next(self._pieces)
      except DataError as e:
        self._skip(e)
        continue
      buf = np.concatenate([[self.carry], piece.tokens, [self.ds.eos_id] if piece.last else []])
      buf = buf.astype(np.int32)
      self._piece, self._pairs = piece, (buf[:-1], buf[1:])
      self._produced = True
    return True

  # -- packing --------------------------------------------------------------------------------

  def __next__(self) -> dict:
    t, align = self.ds.seq_len, self.ds.align
    row = {k: np.zeros(t, np.int32) for k in ROW_KEYS}
    c, seg, seg_start, current = 0, 0, 0, None
    while c < t and self._load():
      inputs, targets = self._pairs
      doc_id = (self.epoch, self.unit, self.doc)
      if doc_id != current:  # a new document in this row
        if align and c % align and self.cursor == 0 and self.offset == 0:
          c += align - c % align
          if c >= t:
            break
        seg, seg_start, current = seg + 1, c, doc_id
      n = min(len(inputs) - self.offset, t - c)
      row["tokens"][c:c + n] = inputs[self.offset:self.offset + n]
      row["targets"][c:c + n] = targets[self.offset:self.offset + n]
      row["segment_ids"][c:c + n] = seg
      row["positions"][c:c + n] = np.arange(c - seg_start, c - seg_start + n)
      c += n
      self.offset += n
    if seg == 0:
      raise StopIteration
    row["loss_mask"] = (row["segment_ids"] > 0).astype(np.int32)
    return row


class WindowShuffle(grain.IterDataset):
  """Rows shuffled within consecutive windows of `window` rows (a seeded permutation per
  window). grain's WindowShuffleIterDataset does the same one index_shuffle call per row, about
  a millisecond each; this one permutes a window at once. The state is the parent's at the
  window's start with the window's index and the position in it, so a restore reads the
  window again and resumes exactly."""

  def __init__(self, parent: grain.IterDataset, *, window: int, seed: int):
    super().__init__(parent)
    self.window, self.seed = window, seed

  def __iter__(self):
    return _WindowShuffleIterator(self._parent.__iter__(), self.window, self.seed)


class _WindowShuffleIterator(grain.DatasetIterator):

  def __init__(self, parent, window: int, seed: int):
    super().__init__(parent)
    self.window, self.seed = window, seed
    self._start = self._parent.get_state()
    self._index, self._pos, self._rows = 0, 0, None

  def _fill(self) -> None:
    self._start = self._parent.get_state()
    rows = []
    for _ in range(self.window):
      try:
        rows.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng([self.seed, self._index]).permutation(len(rows))
    self._rows, self._pos = [rows[i] for i in order], 0

  def __next__(self):
    if self._rows is None or self._pos >= len(self._rows):
      if self._rows is not None:
        self._index += 1
      self._fill()
      if not self._rows:
        raise StopIteration
    row, self._rows[self._pos] = self._rows[self._pos], None
    self._pos += 1
    return row

  def get_state(self) -> dict:
    return {"window_start": self._start, "index": self._index, "pos": self._pos}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["window_start"])
    self._index = int(state["index"])
    self._fill()
    self._pos = int(state["pos"])
    self._rows[:self._pos] = [None] * min(self._pos, len(self._rows))  # already consumed
