"""The held-out token stream that every evaluation reads, drawn across many documents.

Held-out documents are visited in a seeded order (eval.seed: units permuted, then the documents
of each unit), and each contributes a span of at most max(window, N / 16) tokens per pass for a
stream of N tokens, so the stream comes from at least MIN_DOCUMENTS = 16 documents when the
split has them: pass 0 takes the first span of every document, pass 1 the next span of those
that are longer, and so on (a later pass widens the spans so that the few documents left fill
what is missing). The stream is
the spans one after another; each span is a segment of its own (BOS + ids + EOS for a whole
document), and a span that continues the previous one of the same document stays in its
segment. With data.align_documents = N every span starts at a multiple of N (padding: token 0,
segment 0).
"""
from __future__ import annotations

import numpy as np

from lmtrain.data.errors import DataError
from lmtrain.data.sources import open_corpus
from lmtrain.data.tokenizers import get_tokenizer

MIN_DOCUMENTS = 16


def _documents(corpus, seed: int, skip_bad: bool):
  """(identity, document) of the corpus in the seeded order."""
  units = corpus.units
  for u in np.random.default_rng([seed, 17]).permutation(len(units)):
    unit = corpus.open(units[int(u)])
    for d in np.random.default_rng([seed, 17, int(u)]).permutation(unit.num_docs):
      try:
        yield (int(u), int(d)), unit.doc(int(d))
      except DataError:
        if not skip_bad:
          raise


def _span(doc, start: int, stop: int, bos: int, eos: int) -> tuple[np.ndarray, bool]:
  """Tokens [start, stop) of the document's stream BOS + ids + EOS, and whether it goes on."""
  parts, pos = [], 0
  for piece in doc.pieces():
    ids = piece.tokens
    if pos == 0:
      ids = np.concatenate([[bos], ids])
    if piece.last:
      ids = np.concatenate([ids, [eos]])
    lo, hi = max(start - pos, 0), min(stop - pos, len(ids))
    if lo < hi:
      parts.append(ids[lo:hi])
    pos += len(ids)
    if pos >= stop:
      return np.concatenate(parts).astype(np.int32), not (piece.last and pos == stop)
  tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
  return tokens, False


def heldout_stream(cfg, max_tokens: int, doc_tokens: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N], segment ids [N]) of the held-out split, N <= max_tokens + 1 (fewer only when
  the split is smaller). doc_tokens: the shortest span per document and pass, the window the
  stream is cut into (default data.seq_len)."""
  d = cfg.data
  tok = get_tokenizer(d.tokenizer)
  corpus = open_corpus(d, "heldout", tok)
  cap = max(doc_tokens or d.seq_len, max_tokens // MIN_DOCUMENTS)
  align = d.get("align_documents", 0)
  skip = d.get("skip_bad_records", False)
  want = max_tokens + 1
  tokens, segments, total = [], [], 0
  seg, last = 0, None  # last: (identity, end) of the previous span

  def add(identity, span: np.ndarray, start: int) -> None:
    nonlocal seg, last, total
    if last is None or last != (identity, start):
      pad = (-total) % align if align else 0
      if pad:
        tokens.append(np.zeros(pad, np.int32))
        segments.append(np.zeros(pad, np.int32))
        total += pad
      seg += 1
    tokens.append(span)
    segments.append(np.full(len(span), seg, np.int32))
    total += len(span)
    last = (identity, start + len(span))

  alive = []  # (identity, next start) of documents with tokens left after a pass
  for identity, doc in _documents(corpus, cfg.eval.seed, skip):
    span, more = _span(doc, 0, cap, tok.bos_id, tok.eos_id)
    add(identity, span, 0)
    if more:
      alive.append((identity, len(span)))
    if total >= want:
      break
  opened = {}  # the unit of the last document re-read (documents are not kept in memory)
  while total < want and alive:
    width = max(cap, -(-(want - total) // len(alive)))
    left = []
    for (u, d), start in alive:
      if u not in opened:
        opened = {u: corpus.open(corpus.units[u])}
      span, more = _span(opened[u].doc(d), start, start + width, tok.bos_id, tok.eos_id)
      add((u, d), span, start)
      if more:
        left.append(((u, d), start + len(span)))
      if total >= want:
        break
    alive = left
  if not tokens:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(tokens)[:want], np.concatenate(segments)[:want]


def row_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Position of each token within its run of equal segment ids, per row: int32 like the input
  ([T] or [B, T])."""
  seg = np.atleast_2d(segment_ids)
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  starts = np.ones(seg.shape, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return (idx - first).astype(np.int32).reshape(segment_ids.shape)


def disjoint_windows(tokens, segments, window: int):
  """Rows of `window` inputs cut one after another; every target scored once: (inputs,
  targets, segment ids, scored mask). The tail that does not fill a row is dropped. A target
  scores only inside its input's segment (the EOS -> next BOS pair is not a guess) and never
  on padding."""
  n = (len(tokens) - 1) // window
  inputs = tokens[:n * window].reshape(n, window)
  targets = tokens[1:n * window + 1].reshape(n, window)
  seg = segments[:n * window].reshape(n, window)
  tseg = segments[1:n * window + 1].reshape(n, window)
  return [(inputs[i], targets[i], seg[i], (seg[i] == tseg[i]) & (seg[i] > 0)) for i in range(n)]
