"""Token chunks for per-token work (the loss's vocabulary projection, the MLP's recompute):
[B, T, ...] cut into n chunks of `chunk` tokens per row, chunk j holding tokens i * n + j.

Strided rather than contiguous: a sequence axis sharded over devices (ring attention) splits
the `chunk` axis, so every chunk stays evenly sharded instead of being gathered to one device.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def split(x_BT, chunk: int):
  """[B, T, ...] -> [n, B, chunk, ...] with n = ceil(T / chunk), zero padded at the end."""
  b, t = x_BT.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    x_BT = jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2))
  x = x_BT.reshape(b, chunk, n, *x_BT.shape[2:])
  return jnp.moveaxis(x, 2, 0)


def join(x_nBc, t: int):
  """The inverse of `split`: [n, B, chunk, ...] -> [B, T, ...]."""
  n, b, chunk = x_nBc.shape[:3]
  x = jnp.moveaxis(x_nBc, 0, 2)
  return x.reshape(b, chunk * n, *x_nBc.shape[3:])[:, :t]


def map_tokens(fn: Callable, inputs, chunk: int):
  """fn over chunks of `chunk` tokens, one chunk at a time, each under jax.checkpoint (the
  backward pass recomputes a chunk's insides instead of keeping every chunk's). `inputs` is a
  tuple of [B, T, ...] arrays, fn takes their chunks [B, c, ...] and returns per-token
  [B, c, ...] arrays (a tuple or one). The whole sequence at once when it fits one chunk."""
  t = inputs[0].shape[1]
  if chunk <= 0 or chunk >= t:
    return fn(*inputs)
  one = jax.checkpoint(fn)
  _, out = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None,
                        tuple(split(x, chunk) for x in inputs))
  return jax.tree.map(lambda y: join(y, t), out)
