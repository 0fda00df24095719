"""MQAR recall accuracy by number of key-value pairs and sequence length."""
from __future__ import annotations

import numpy as np

from lmtrain.data.mqar import max_pairs, mqar_row
from lmtrain.evals.scoring import batched

EVAL_SEED = 7_777_777  # rows no training run sees (training uses train.seed)


def mqar_grid(scorer, params, *, pairs, lengths, samples: int, batch_tokens: int) -> dict:
  """accuracy[p][l]: fraction of queried values predicted exactly (greedy); None where the
  pairs do not fit the length."""
  acc = []
  for n in pairs:
    row_acc = []
    for length in lengths:
      if n > max_pairs(length) or n > 128:
        row_acc.append(None)
        continue
      rows = [mqar_row(EVAL_SEED + n, i, seq_len=length, num_pairs=n) for i in range(samples)]
      hits = total = 0
      for chunk in batched(rows, max(1, batch_tokens // length)):
        b = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        _, correct = scorer.score(params, b["tokens"], b["targets"], b["segment_ids"])
        mask = b["loss_mask"] > 0
        hits += int(np.sum(correct[mask]))
        total += int(np.sum(mask))
      row_acc.append(hits / total)
    acc.append(row_acc)
  valid = [a for row in acc for a in row if a is not None]
  return {"pairs": list(pairs), "lengths": list(lengths), "samples": samples, "accuracy": acc,
          "mean_accuracy": float(np.mean(valid)) if valid else None}
