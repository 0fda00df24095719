"""Position encodings: rotary (RoPE), ALiBi slopes, and positions recovered from segment ids."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import segment_starts


def positions_from_segments(segment_ids_BT):
  """Position of each token within its own segment (packed documents restart at 0): [B, T]."""
  idx = jnp.arange(segment_ids_BT.shape[1], dtype=jnp.int32)[None, :]
  return idx - segment_starts(segment_ids_BT)


def apply_rope(x_BTHD, positions_BT, *, theta: float = 10000.0):
  """Rotates pairs (x[i], x[i + D/2]) by angle pos * theta^(-2i/D); computed in fp32 (fp64 for
  fp64 inputs)."""
  d = x_BTHD.shape[-1]
  half = d // 2
  ct = jnp.promote_types(x_BTHD.dtype, jnp.float32)
  inv_freq = theta ** (-jnp.arange(half, dtype=ct) * 2.0 / d)
  angle_BTF = positions_BT.astype(ct)[..., None] * inv_freq
  sin = jnp.sin(angle_BTF)[:, :, None, :]
  cos = jnp.cos(angle_BTF)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(ct), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The geometric ALiBi slopes of Press et al. (2022), [H] float32, for any head count."""
  def power_of_two(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]

  if math.log2(num_heads).is_integer():
    slopes = power_of_two(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, np.float32)
