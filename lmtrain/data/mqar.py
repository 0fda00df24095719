"""MQAR, multi-query associative recall, as Zoology generates it (Arora et al., 2023, "Zoology:
Measuring and Improving Recall in Efficient Language Models", `multiquery_ar` in
HazyResearch/zoology), as a data source.

One example of `seq_len` tokens over a vocabulary of `vocab_size` ids:
  - keys are drawn without replacement from [1, V/2), values without replacement from [V/2, V);
  - the first 2 * num_pairs tokens are k1 v1 k2 v2 ...;
  - every key is queried once, at position 2 * num_pairs + 2 * gap, with the gaps drawn without
    replacement from range((seq_len - 2 * num_pairs) // 2) with probability proportional to
    (gap + 1) ** (power_a - 1) (a power law: most queries come soon after the pairs);
  - the token after a query is not its value: the model must predict the value while reading the
    key, and only those predictions are scored (loss_mask), one per pair;
  - every other token (Zoology's 0 blank) is replaced by a random id from [0, V) when
    random_non_queries (Zoology's default), so finding the queries is part of the task.

Correspondence with Zoology: the same layout, distributions and scoring. Two differences, both
for a random-access, shardable, exactly resumable grain source: each row has its own generator
seeded by (seed, index) (Zoology seeds numpy once per dataset), and rows are generated on the fly
rather than as a fixed set of 100k training examples (so there are no epochs; a step count plays
that role). Zoology's vocabulary is 8192; ours defaults to 256 so that it fits the byte-level
model (data.mqar_vocab_size, at most model.vocab_size), whatever the tokenizer.
"""
from __future__ import annotations

import functools

import grain

import numpy as np


def max_pairs(seq_len: int, vocab_size: int = 256) -> int:
  """Pairs and their queries take 4 tokens each; keys come from [1, V/2) without replacement."""
  return min(seq_len // 4, vocab_size // 2 - 1, vocab_size - vocab_size // 2)


def check(seq_len: int, num_pairs: int, vocab_size: int) -> None:
  if seq_len % 2:
    raise ValueError(f"mqar: seq_len={seq_len} must be even (pairs and queries take 2 tokens)")
  if not 1 <= num_pairs <= max_pairs(seq_len, vocab_size):
    raise ValueError(f"mqar: num_pairs={num_pairs} does not fit seq_len={seq_len} and "
                     f"vocab_size={vocab_size} (1..{max_pairs(seq_len, vocab_size)})")


@functools.lru_cache(maxsize=64)
def gap_probabilities(space: int, power_a: float) -> np.ndarray:
  """Zoology's power law over query gaps 0 .. space - 1: p(g) ~ power_a * (g + 1)^(power_a - 1)."""
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  p = p / p.sum()
  p.setflags(write=False)  # shared by the cache
  return p


def mqar_row(seed: int, index: int, *, seq_len: int, num_pairs: int, vocab_size: int = 256,
             power_a: float = 0.01, random_non_queries: bool = True) -> dict:
  """One example as int32 arrays [seq_len] (tokens, targets, segment_ids, positions, loss_mask)
  plus `query_distance` [seq_len]: for a scored position, how many tokens back its key-value pair
  starts (what a sliding window must span to answer it), else 0."""
  check(seq_len, num_pairs, vocab_size)
  rng = np.random.default_rng([seed, index])
  half = vocab_size // 2
  keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
  values = rng.choice(np.arange(half, vocab_size), size=num_pairs, replace=False)
  context = 2 * num_pairs
  space = (seq_len - context) // 2
  # num_pairs distinct gaps drawn one after another with probabilities p (Zoology's
  # choice(replace=False, p=p)), sampled at once by the Gumbel-top-k trick (5x faster)
  scores = np.log(gap_probabilities(space, power_a)) + rng.gumbel(size=space)
  gaps = np.argsort(-scores)[:num_pairs]
  inputs = np.zeros(seq_len, np.int64)
  inputs[0:context:2] = keys
  inputs[1:context:2] = values
  query_pos = context + 2 * gaps  # pair i's key is queried at query_pos[i]
  inputs[query_pos] = keys
  targets = np.zeros(seq_len, np.int64)
  targets[query_pos] = values  # predicted while reading the key (Zoology's shifted labels)
  loss_mask = np.zeros(seq_len, np.int32)
  loss_mask[query_pos] = 1
  distance = np.zeros(seq_len, np.int32)
  distance[query_pos] = query_pos - 2 * np.arange(num_pairs)
  if random_non_queries:
    blank = inputs == 0
    inputs[blank] = rng.integers(vocab_size, size=seq_len)[blank]
  return {"tokens": inputs.astype(np.int32), "targets": targets.astype(np.int32),
          "segment_ids": np.ones(seq_len, np.int32),
          "positions": np.arange(seq_len, dtype=np.int32), "loss_mask": loss_mask,
          "query_distance": distance}


def parse_pairs(text) -> list[int]:
  """data.mqar_num_pairs: one count, or a comma list that rows draw from uniformly (a mixture,
  as Zoology's multi-segment training sets)."""
  return [int(x) for x in str(text).split(",") if x.strip()]


def mqar_dataset(*, seed: int, seq_len: int, num_pairs, batch_size: int,
                 vocab_size: int = 256, power_a: float = 0.01, random_non_queries: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 num_rows: int | None = None) -> grain.IterDataset:
  """Batches of MQAR rows (the model's batch keys); endless unless num_rows is given. Hosts take
  disjoint rows. num_pairs: an int or a list / comma list to draw each row's count from.

  Batch j of host p holds rows (j * process_count + p) * batch_size + r, r < batch_size, each
  generated from its own (seed, row) as in `mqar_row`: one grain element per batch, because
  grain's per-element bookkeeping cost three times the row itself."""
  choices = parse_pairs(num_pairs) if isinstance(num_pairs, str) else (
      list(num_pairs) if isinstance(num_pairs, (list, tuple)) else [int(num_pairs)])
  for n in choices:
    check(seq_len, n, vocab_size)
  rows = num_rows if num_rows is not None else 2 ** 40
  num_batches = rows // (batch_size * process_count)

  def row(i: int) -> dict:
    n = choices[np.random.default_rng([seed, i, 1]).integers(len(choices))]
    r = mqar_row(seed, i, seq_len=seq_len, num_pairs=n, vocab_size=vocab_size,
                 power_a=power_a, random_non_queries=random_non_queries)
    del r["query_distance"]
    return r

  def batch(j) -> dict:
    first = (int(j) * process_count + process_index) * batch_size
    rs = [row(first + r) for r in range(batch_size)]
    return {k: np.stack([r[k] for r in rs]) for k in rs[0]}

  # one read-ahead thread: more only contend for the interpreter lock with the train step
  return grain.MapDataset.range(num_batches).map(batch).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
