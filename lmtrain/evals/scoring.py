"""Scoring a next-token model: per-token NLL and greedy correctness, token-weighted sums."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Scorer:
  """Wraps apply(params, tokens [B, T], segment_ids [B, T]) -> logits [B, T, V], or `losses`:
  (params, tokens, targets, segment_ids) -> (nll [B, T], correct [B, T]) computed without the
  whole logits (lmtrain's model: the vocabulary projection over chunks of tokens).

  score(params, tokens, targets, segment_ids) -> (nll [B, T] float64, correct [B, T] bool),
  where correct means the greedy (argmax) token equals the target. One compile per shape.
  """

  def __init__(self, apply: Callable | None = None, *, losses: Callable | None = None,
               jit: bool = True):
    def score(params, tokens, targets, segment_ids):
      logits = apply(params, tokens, segment_ids).astype(jnp.float32)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return nll, jnp.argmax(logits, axis=-1) == targets

    score = losses if losses is not None else score
    self._score = jax.jit(score) if jit else score

  def score(self, params, tokens, targets, segment_ids):
    nll, correct = self._score(params, jnp.asarray(tokens, jnp.int32),
                               jnp.asarray(targets, jnp.int32),
                               jnp.asarray(segment_ids, jnp.int32))
    return np.asarray(nll, np.float64), np.asarray(correct)


def model_scorer(model_fns) -> Scorer:
  """A Scorer for lmtrain's Transformer (positions are derived from the segment ids): the
  memory savings of training apply (scanned layers, the loss over chunks of tokens, never the
  [B, T, V] logits), so long contexts fit where the train step does."""
  return Scorer(losses=lambda params, tokens, targets, seg: model_fns.token_losses(
      params, tokens, targets, seg, with_correct=True))


@dataclasses.dataclass
class NllTotals:
  """Token-weighted totals: means are sums over tokens divided by token (or byte) counts."""
  nll: float = 0.0
  tokens: int = 0
  bytes: int = 0

  def add(self, nll_values, num_bytes: int) -> None:
    self.nll += float(np.sum(nll_values))
    self.tokens += int(np.size(nll_values))
    self.bytes += int(num_bytes)

  def summary(self) -> dict:
    nats = self.nll / max(self.tokens, 1)
    return {"nats_per_token": nats, "perplexity": float(np.exp(nats)),
            "bits_per_byte": self.nll / np.log(2.0) / max(self.bytes, 1),
            "tokens": self.tokens, "bytes": self.bytes}


def batched(rows: list, batch_size: int):
  for i in range(0, len(rows), batch_size):
    yield rows[i:i + batch_size]
