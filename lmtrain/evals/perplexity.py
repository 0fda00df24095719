"""Perplexity over a held-out token stream, in disjoint or strided sliding windows.

The stream (lmtrain.data.heldout) is spans of many held-out documents in a seeded order, each
BOS + tokens + EOS with a segment id per span (as in training, a token never attends across
documents). Every target is scored exactly once; results are token-weighted (sum of NLL over
all scored tokens / their number), never a mean of per-window means. Bits per byte divide the
total NLL (in bits) by the bytes of the scored targets, decoded by the tokenizer (BOS/EOS count
no bytes), so they compare across tokenizers.
"""
from __future__ import annotations

import numpy as np

from lmtrain.data.heldout import disjoint_windows, heldout_stream
from lmtrain.data.tokenizers import get_tokenizer
from lmtrain.evals.scoring import NllTotals, batched

__all__ = ["disjoint_windows", "evaluate_rows", "heldout_stream", "perplexity",
           "sliding_windows"]


def sliding_windows(tokens, segments, window: int, stride: int):
  """Windows of `window` inputs starting every `stride` tokens; each window scores only the
  targets no earlier window scored (its last `stride`, or all of the first), so every target
  is scored once, with at least window - stride tokens of context after the first window.
  The scored targets are exactly those of `disjoint_windows` (a last window is aligned to end
  where they end), so the two modes compare like for like; stride == window gives the same rows.
  """
  if not 0 < stride <= window:
    raise ValueError(f"sliding window stride={stride} must be in (0, window={window}]")
  limit = (len(tokens) - 1) // window * window
  rows, scored_until, start = [], 0, 0
  while scored_until < limit:
    start = min(start, limit - window)
    end = start + window
    inputs, targets = tokens[start:end], tokens[start + 1:end + 1]
    seg, tseg = segments[start:end], segments[start + 1:end + 1]
    score = np.zeros(window, bool)
    score[scored_until - start:] = True
    rows.append((inputs, targets, seg, score & (seg == tseg) & (seg > 0)))
    scored_until = end
    start += stride
  return rows


def evaluate_rows(scorer, params, rows, tokenizer, batch_size: int) -> NllTotals:
  totals = NllTotals()
  for chunk in batched(rows, batch_size):
    inputs, targets, seg, score = (np.stack(x) for x in zip(*chunk))
    nll, _ = scorer.score(params, inputs, targets, seg)
    totals.add(nll[score], tokenizer.num_bytes(targets[score]))
  return totals


def perplexity(scorer, params, cfg, *, window: int, stride: int | None = None,
               max_tokens: int, batch_size: int) -> dict:
  """{"disjoint": {...}, "sliding": {...}} with nats/token, perplexity and bits per byte."""
  tok = get_tokenizer(cfg.data.tokenizer)
  tokens, segments = heldout_stream(cfg, max_tokens, doc_tokens=window)
  out = {"window": window,
         "disjoint": evaluate_rows(scorer, params, disjoint_windows(tokens, segments, window),
                                   tok, batch_size).summary()}
  if stride is not None:
    rows = sliding_windows(tokens, segments, window, stride)
    out["stride"] = stride
    out["sliding"] = evaluate_rows(scorer, params, rows, tok, batch_size).summary()
  return out
