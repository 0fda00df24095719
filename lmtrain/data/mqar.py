"""MQAR, multi-query associative recall (Arora et al., "Zoology", 2023), as a data source.

A row holds `num_pairs` key-value pairs, then the keys again as queries at random places; the
model must emit each key's value right after the query. Only those answers are scored
(loss_mask), so the loss measures recall alone.

Token layout (fits the byte tokenizer's 258 ids): 0 is the filler between queries, keys are
1..128 and values 129..256. Rows are a pure function of (seed, index), so a grain MapDataset of
them is random-access, shardable and exactly resumable.
"""
from __future__ import annotations

import grain
import numpy as np

FILLER = 0
KEYS = np.arange(1, 129)
VALUES = np.arange(129, 257)


def max_pairs(seq_len: int) -> int:
  """Pairs take 2 tokens and their queries 2 more: at most seq_len // 4 pairs fit (+1 target)."""
  return (seq_len + 1) // 4


def mqar_row(seed: int, index: int, *, seq_len: int, num_pairs: int) -> dict:
  """One example as int32 arrays [seq_len] (tokens, targets, segment_ids, positions, loss_mask)."""
  if not 1 <= num_pairs <= min(max_pairs(seq_len), len(KEYS)):
    raise ValueError(f"mqar: num_pairs={num_pairs} does not fit seq_len={seq_len} "
                     f"(1..{min(max_pairs(seq_len), len(KEYS))})")
  rng = np.random.default_rng([seed, index])
  keys = rng.choice(KEYS, size=num_pairs, replace=False)
  values = rng.choice(VALUES, size=num_pairs, replace=True)
  seq = np.full(seq_len + 1, FILLER, np.int32)  # one extra: the last target
  seq[0:2 * num_pairs:2] = keys
  seq[1:2 * num_pairs:2] = values
  # Queries: each key once, in random order, at distinct random slots after the pairs; a query
  # at slot p puts the key at p and the value (the answer) at p + 1.
  free = (seq_len + 1 - 2 * num_pairs) // 2
  slots = 2 * num_pairs + 2 * np.sort(rng.choice(free, size=num_pairs, replace=False))
  order = rng.permutation(num_pairs)
  seq[slots] = keys[order]
  seq[slots + 1] = values[order]
  loss_mask = np.zeros(seq_len, np.int32)
  loss_mask[slots] = 1  # position p's target is seq[p + 1], the value
  return {"tokens": seq[:-1].copy(), "targets": seq[1:].copy(),
          "segment_ids": np.ones(seq_len, np.int32),
          "positions": np.arange(seq_len, dtype=np.int32), "loss_mask": loss_mask}


def mqar_dataset(*, seed: int, seq_len: int, num_pairs: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 num_rows: int | None = None) -> grain.IterDataset:
  """Batches of MQAR rows; endless unless num_rows is given. Hosts take disjoint rows."""
  n = num_rows if num_rows is not None else 2 ** 40
  ds = grain.MapDataset.range(n)
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = ds.map(lambda i: mqar_row(seed, int(i), seq_len=seq_len, num_pairs=num_pairs))
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)
