"""Perplexity over a held-out token stream, in disjoint or strided sliding windows.

The stream is the held-out documents one after another, each as BOS + bytes + EOS, with a
segment id per document (as in training, a token never attends across documents). Every target
is scored exactly once; results are token-weighted (sum of NLL over all scored tokens / their
number), never a mean of per-window means. Bits per byte divide the total NLL (in bits) by the
UTF-8 bytes of the scored targets (BOS/EOS count no bytes).
"""
from __future__ import annotations

import numpy as np

from lmtrain.data.sources import load_documents
from lmtrain.data.tokenizers import get_tokenizer
from lmtrain.evals.scoring import NllTotals, batched


def heldout_stream(cfg, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N], segment ids [N]) of the held-out documents, at most max_tokens + 1 tokens."""
  tok = get_tokenizer(cfg.data.tokenizer)
  tokens, segments = [], []
  total = 0
  for i, doc in enumerate(_iter_docs(cfg)):
    ids = np.concatenate([[tok.bos_id], tok.encode(doc), [tok.eos_id]]).astype(np.int32)
    tokens.append(ids)
    segments.append(np.full(len(ids), i + 1, np.int32))
    total += len(ids)
    if total > max_tokens:
      break
  stream, seg = np.concatenate(tokens)[:max_tokens + 1], np.concatenate(segments)[:max_tokens + 1]
  return stream, seg


def _iter_docs(cfg):
  docs = load_documents(cfg.data, "heldout")
  for i in range(len(docs)):
    yield docs[i]


def disjoint_windows(tokens, segments, window: int):
  """Rows of `window` inputs cut one after another; every target scored once. The tail that
  does not fill a row is dropped."""
  n = (len(tokens) - 1) // window
  inputs = tokens[:n * window].reshape(n, window)
  targets = tokens[1:n * window + 1].reshape(n, window)
  seg = segments[:n * window].reshape(n, window)
  # A target scores only inside its input's document (the EOS -> next BOS pair is not a guess).
  tseg = segments[1:n * window + 1].reshape(n, window)
  return [(inputs[i], targets[i], seg[i], seg[i] == tseg[i]) for i in range(n)]


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
    rows.append((inputs, targets, seg, score & (seg == tseg)))
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
  tokens, segments = heldout_stream(cfg, max_tokens)
  out = {"window": window,
         "disjoint": evaluate_rows(scorer, params, disjoint_windows(tokens, segments, window),
                                   tok, batch_size).summary()}
  if stride is not None:
    rows = sliding_windows(tokens, segments, window, stride)
    out["stride"] = stride
    out["sliding"] = evaluate_rows(scorer, params, rows, tok, batch_size).summary()
  return out
