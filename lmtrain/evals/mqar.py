"""MQAR recall accuracy (Zoology's metric: greedy predictions at the query positions) by number
of key-value pairs and sequence length, and by how far back each query's pair lies."""
from __future__ import annotations

import numpy as np

from lmtrain.data.mqar import max_pairs, mqar_row
from lmtrain.evals.scoring import batched

EVAL_SEED = 7_777_777  # rows no training run sees (training uses train.seed)


def distance_bucket(distance: np.ndarray) -> np.ndarray:
  """log2 buckets of query distance: bucket b holds distances in [2^(b-1), 2^b)."""
  return np.ceil(np.log2(np.maximum(distance, 1) + 1)).astype(int)


def mqar_grid(scorer, params, *, pairs, lengths, samples: int, batch_tokens: int,
              vocab_size: int = 256, power_a: float = 0.01,
              random_non_queries: bool = True) -> dict:
  """accuracy[p][l]: fraction of queried values predicted exactly (greedy); None where the
  pairs do not fit the length. by_distance: accuracy over all cells by log2 bucket of the
  distance from a query back to its pair (a sliding window shorter than it cannot answer)."""
  acc = []
  dist_hits: dict[int, list[int]] = {}
  for n in pairs:
    row_acc = []
    for length in lengths:
      if length % 2 or n > max_pairs(length, vocab_size):
        row_acc.append(None)
        continue
      rows = [mqar_row(EVAL_SEED + n, i, seq_len=length, num_pairs=n, vocab_size=vocab_size,
                       power_a=power_a, random_non_queries=random_non_queries)
              for i in range(samples)]
      hits = total = 0
      for chunk in batched(rows, max(1, batch_tokens // length)):
        b = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        _, correct = scorer.score(params, b["tokens"], b["targets"], b["segment_ids"])
        mask = b["loss_mask"] > 0
        hits += int(np.sum(correct[mask]))
        total += int(np.sum(mask))
        for bucket, ok in zip(distance_bucket(b["query_distance"][mask]), correct[mask]):
          h = dist_hits.setdefault(int(bucket), [0, 0])
          h[0] += int(ok)
          h[1] += 1
      row_acc.append(hits / total)
    acc.append(row_acc)
  valid = [a for row in acc for a in row if a is not None]
  by_distance = [{"bucket": b, "max_distance": 2 ** b - 1, "accuracy": h[0] / h[1],
                  "queries": h[1]} for b, h in sorted(dist_hits.items())]
  return {"pairs": list(pairs), "lengths": list(lengths), "samples": samples, "accuracy": acc,
          "mean_accuracy": float(np.mean(valid)) if valid else None,
          "by_distance": by_distance, "vocab_size": vocab_size, "power_a": power_a}
