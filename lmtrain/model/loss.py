"""Next-token losses without the whole [B, T, V] float32 logits: the final norm, the output
projection and the cross-entropy run over chunks of tokens, forward and backward.

The chunks (lmtrain.model.chunks) are one lax.scan whose body is wrapped in jax.checkpoint:
the backward pass recomputes each chunk's logits instead of keeping them, so at most one chunk
of logits (and its gradient) is live at a time, whatever T and V are. Every token's loss is
computed by the same operations as without chunks (same norm, projection, log-softmax), so the
result equals the unchunked loss up to the rounding of a matmul of another shape.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lmtrain.model import chunks

# train.loss_chunk=0 (auto): a chunk's fp32 logits take at most this many bytes per device, and
# sequences whose whole logits fit run unchunked.
AUTO_LOGITS_BYTES = 64 * 2 ** 20
MIN_AUTO_CHUNK = 16


def data_parallel_rows(batch: int) -> int:
  """Rows of a [B, ...] batch on each device under the current mesh (data x fsdp)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return batch
  ways = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))
  return batch // ways if batch % ways == 0 else batch


def chunk_tokens(setting: int, rows: int, seq_len: int, vocab: int) -> int:
  """Tokens per row in one chunk: `setting` when > 0, else (auto) the whole sequence when its
  logits fit AUTO_LOGITS_BYTES, or the largest power of two whose logits do (>= 16)."""
  if setting > 0:
    return min(setting, seq_len)
  per_token = max(rows, 1) * vocab * 4
  if per_token * seq_len <= AUTO_LOGITS_BYTES:
    return seq_len
  chunk = 1 << max(0, (AUTO_LOGITS_BYTES // per_token).bit_length() - 1)
  return min(max(chunk, MIN_AUTO_CHUNK), seq_len)


def _stats(logits, targets, with_correct: bool):
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if not with_correct:
    return (nll,)
  return nll, jnp.argmax(logits, axis=-1) == targets


def token_losses(hidden_BTD, targets_BT, logits_fn: Callable, *, chunk: int,
                 with_correct: bool = False):
  """Per-token cross-entropy [B, T] float32 of logits_fn(hidden) against the targets, and with
  `with_correct` also whether the argmax is the target [B, T] bool. logits_fn maps [..., D] to
  [..., V] float32 (the model's final norm and output projection); it sees at most
  [B, chunk, D] at a time. Returns a tuple."""
  return chunks.map_tokens(lambda x, targets: _stats(logits_fn(x), targets, with_correct),
                           (hidden_BTD, targets_BT), chunk)
