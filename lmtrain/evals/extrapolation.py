"""Length extrapolation: perplexity at lengths T/4 ... 16T for a model trained at T, and the
loss by token position (the context a token had) in log2 buckets.

Rows are disjoint windows of the held-out stream (documents separated by segment ids, as in
training). A length that runs out of memory is reported as skipped, and so are longer ones.
"""
from __future__ import annotations

import numpy as np

from lmtrain.data.tokenizers import get_tokenizer
from lmtrain.evals.perplexity import disjoint_windows, heldout_stream
from lmtrain.evals.scoring import NllTotals, batched
from pallas_kernels._common import segment_starts


def position_buckets(positions):
  """0 for position 0, then b for positions in [2^(b-1), 2^b): int array like `positions`."""
  positions = np.asarray(positions)
  return np.where(positions == 0, 0, np.floor(np.log2(np.maximum(positions, 1))).astype(int) + 1)


def bucket_label(b: int) -> str:
  return "0" if b == 0 else f"{2 ** (b - 1)}-{2 ** b - 1}"


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text


def extrapolation(scorer, params, cfg, *, train_length: int, factors, tokens_per_length: int,
                  batch_tokens: int, max_length: int = 0) -> dict:
  tok = get_tokenizer(cfg.data.tokenizer)
  lengths = sorted({max(1, int(round(train_length * f))) for f in factors})
  stream, segments = heldout_stream(cfg, max(tokens_per_length, max(lengths)) + 1,
                                    doc_tokens=max(lengths))
  results, skipped = [], []
  bucket_sum, bucket_count = np.zeros(64), np.zeros(64, np.int64)
  failed_at = None
  for length in lengths:
    if max_length and length > max_length:
      skipped.append({"length": length, "reason": f"over eval.max_length={max_length}"})
      continue
    if failed_at is not None:
      skipped.append({"length": length, "reason": f"length {failed_at} ran out of memory"})
      continue
    rows = disjoint_windows(stream, segments, length)[:max(1, tokens_per_length // length)]
    if not rows:
      skipped.append({"length": length, "reason": "held-out text shorter than one row"})
      continue
    totals = NllTotals()
    try:
      for chunk in batched(rows, max(1, batch_tokens // length)):
        inputs, targets, seg, score = (np.stack(x) for x in zip(*chunk))
        nll, _ = scorer.score(params, inputs, targets, seg)
        totals.add(nll[score], tok.num_bytes(targets[score]))
        # the context a token had: its position within its document piece in this row
        pos = np.arange(length)[None, :] - np.asarray(segment_starts(seg))
        buckets = position_buckets(pos[score])
        bucket_sum += np.bincount(buckets, weights=nll[score], minlength=64)[:64]
        bucket_count += np.bincount(buckets, minlength=64)[:64]
    except Exception as e:  # noqa: BLE001 - only memory exhaustion is expected here
      if not _is_out_of_memory(e):
        raise
      skipped.append({"length": length, "reason": "out of memory"})
      failed_at = length
      continue
    results.append({"length": length, "factor": length / train_length,
                    **totals.summary(), "rows": len(rows)})
  buckets = [{"bucket": int(b), "positions": bucket_label(int(b)),
              "nats_per_token": float(bucket_sum[b] / bucket_count[b]),
              "tokens": int(bucket_count[b])} for b in np.flatnonzero(bucket_count)]
  return {"train_length": train_length, "lengths": results, "skipped": skipped,
          "loss_by_position": buckets}
