"""grain pipelines: a corpus -> packed rows (lmtrain.data.packing) -> shuffled in windows ->
batches; and the held-out batches of the trainer's eval loss.

A batch is a dict of int32 numpy arrays, all [B, T] (BATCH_KEYS):
  tokens (inputs), targets (the next token), segment_ids (0 = padding), positions (within the
  document piece), loss_mask (1 where the target is scored).
Every piece of a document is its own segment, so attention never crosses a document or a row.

Memory of the input pipeline (per host), whatever the document sizes: one unit's index, one
piece of text and its tokens (data.piece_bytes, 1 MiB by default: a few MiB with the tokens),
the row shuffle window (data.shuffle_window rows of 20 * seq_len bytes: 5 MiB for 1024 x 256)
and one batch read ahead. A JSON line or Parquet value is parsed whole, so the largest single
record (and a Parquet row group's text column) adds its own size a few times over; text files
are streamed in pieces however long.
"""
from __future__ import annotations

import grain
import numpy as np

from lmtrain.data.errors import DataError
from lmtrain.data.heldout import disjoint_windows, heldout_stream, row_positions
from lmtrain.data.mqar import mqar_dataset
from lmtrain.data.packing import ROW_KEYS, PackedRows, WindowShuffle
from lmtrain.data.sources import open_corpus
from lmtrain.data.tokenizers import get_tokenizer

BATCH_KEYS = ROW_KEYS
_FIRST_RECORDS = 4  # read before training to find a missing field or a malformed file early


def packed_dataset(corpus, tokenizer, *, seq_len: int, batch_size: int, seed: int | None,
                   shuffle_window: int = 0, process_index: int = 0, process_count: int = 1,
                   repeat: bool = True, align: int = 0,
                   skip_bad_records: bool = False) -> grain.IterDataset:
  """Batches of packed rows of a corpus. seed=None keeps the source order (no shuffling).

  Rows are shuffled within windows of `shuffle_window` rows: one long document fills many
  consecutive rows, and a batch should not be one file.
  """
  it = PackedRows(corpus, seq_len=seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                  seed=seed, align=align, repeat=repeat, skip_bad_records=skip_bad_records,
                  process_index=process_index, process_count=process_count)
  if seed is not None and shuffle_window > 1:
    it = WindowShuffle(it, window=shuffle_window, seed=seed)
  return it.batch(batch_size, drop_remainder=True)


def mqar_options(data_cfg) -> dict:
  """The generator settings of data.mqar_* (vocabulary, power law, random filler)."""
  return {"vocab_size": data_cfg.mqar_vocab_size, "power_a": data_cfg.mqar_power_a,
          "random_non_queries": data_cfg.mqar_random_non_queries}


# MQAR rows of the held-out split come from another seed than the training rows.
MQAR_HELDOUT_SEED_OFFSET = 1_000_003


def check_first_records(corpus, skip_bad_records: bool, units: int = 8) -> None:
  """Reads the first piece of the first documents, so that a source whose records all lack the
  field (or a damaged shard) fails before anything compiles, in one line."""
  verify = getattr(corpus, "verify", None)
  if verify is not None:
    verify()
  read = 0
  for ref in corpus.units[:units]:
    unit = corpus.open(ref)
    for i in range(min(unit.num_docs, _FIRST_RECORDS - read)):
      try:
        next(unit.doc(i).pieces())
      except DataError:
        if not skip_bad_records:
          raise
      read += 1
    if read >= _FIRST_RECORDS:
      return


def train_dataset(cfg, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training stream of this host: its units of the training split, repeated forever.
  Checks the source first (paths, columns, shards, the first records): DataError, one line."""
  if cfg.data.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if cfg.data.source == "mqar":
    return mqar_dataset(seed=cfg.train.seed, seq_len=cfg.data.seq_len,
                        num_pairs=cfg.data.mqar_num_pairs,
                        batch_size=cfg.data.batch_size // process_count,
                        process_index=process_index, process_count=process_count,
                        **mqar_options(cfg.data))
  tok = get_tokenizer(cfg.data.tokenizer)
  corpus = open_corpus(cfg.data, "train", tok)
  check_first_records(corpus, cfg.data.skip_bad_records)
  return packed_dataset(corpus, tok, seq_len=cfg.data.seq_len,
                        batch_size=cfg.data.batch_size // process_count, seed=cfg.train.seed,
                        shuffle_window=cfg.data.shuffle_window, process_index=process_index,
                        process_count=process_count, align=cfg.data.align_documents,
                        skip_bad_records=cfg.data.skip_bad_records)


def heldout_batches(cfg, *, num_batches: int | None = None, seq_len: int | None = None,
                    batch_size: int | None = None) -> list[dict]:
  """Batches of held-out rows, the same every call: disjoint windows of the held-out stream
  (lmtrain.data.heldout: spans of many documents in a seeded order). DataError when the split
  has less than one batch."""
  n = num_batches or cfg.data.eval_batches
  t = seq_len or cfg.data.seq_len
  bs = batch_size or cfg.data.batch_size
  if cfg.data.source == "mqar":
    return list(mqar_dataset(seed=cfg.train.seed + MQAR_HELDOUT_SEED_OFFSET, seq_len=t,
                             num_pairs=cfg.data.mqar_num_pairs, batch_size=bs,
                             num_rows=n * bs, **mqar_options(cfg.data)))
  tokens, segments = heldout_stream(cfg, n * bs * t, doc_tokens=t)
  rows = disjoint_windows(tokens, segments, t)
  if len(rows) < bs:
    raise DataError(f"the held-out split of data.source={cfg.data.source!r} has "
                    f"{len(tokens)} tokens, too few for one batch of {bs} x {t} (raise "
                    "data.heldout_percent, give data.eval_path, or lower data.eval_batches / "
                    "data.batch_size)")
  out = []
  for b in range(min(n, len(rows) // bs)):
    inputs, targets, seg, score = (np.stack(x) for x in zip(*rows[b * bs:(b + 1) * bs]))
    seg = seg.astype(np.int32)
    out.append({"tokens": inputs.astype(np.int32), "targets": targets.astype(np.int32),
                "segment_ids": seg, "positions": row_positions(seg),
                "loss_mask": score.astype(np.int32)})
  return out


def _lists_to_tuples(x):
  if isinstance(x, dict):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_lists_to_tuples(v) for v in x)
  return x


def set_iterator_state(iterator, state: dict) -> None:
  """Restores a grain iterator from JSON-loaded state (JSON turns tuples into lists; grain's
  own iterators compare some of their state with tuples)."""
  iterator.set_state(_lists_to_tuples(state))
