"""The attention layer: projections, positions, and the attention function picked by config."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from lmtrain.model import positions as pos
from lmtrain.model.layers import INIT_STD, normal_init


class Attention(nnx.Module):
  """x [B, T, D] -> [B, T, D]; q [B, T, Hq, Dh], k/v [B, T, Hkv, Dh] in between."""

  def __init__(self, dims, attn_cfg, kind: str, *, out_std: float, rngs: nnx.Rngs):
    self.dims, self.attn_cfg, self.kind = dims, attn_cfg, kind
    h, hkv, dh, d = dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.d_model
    proj = lambda out, axes: nnx.LinearGeneral(d, out, use_bias=False, dtype=dims.compute_dtype,
                                               kernel_init=normal_init(axes), rngs=rngs)
    self.q_proj = proj((h, dh), ("embed", "heads", "head_dim"))
    self.k_proj = proj((hkv, dh), ("embed", "kv_heads", "head_dim"))
    self.v_proj = proj((hkv, dh), ("embed", "kv_heads", "head_dim"))
    self.o_proj = nnx.LinearGeneral((h, dh), d, axis=(-2, -1), use_bias=False,
                                    dtype=dims.compute_dtype,
                                    kernel_init=normal_init(("heads", "head_dim", "embed"), out_std),
                                    rngs=rngs)
    self.alibi = tuple(pos.alibi_slopes(h).tolist()) if dims.position == "alibi" else None

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    q = self.q_proj(x_BTD)
    k = self.k_proj(x_BTD)
    v = self.v_proj(x_BTD)
    if self.dims.position == "rope":
      q = pos.apply_rope(q, positions_BT, theta=self.dims.rope_theta)
      k = pos.apply_rope(k, positions_BT, theta=self.dims.rope_theta)
    out = self._attend(q, k, v, segment_ids_BT)
    return self.o_proj(out)

  def _attend(self, q, k, v, segment_ids):
    a = self.attn_cfg
    if self.kind == "softmax":
      return pallas_kernels.blockwise_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                                alibi_slopes=self._alibi_slopes(), impl=a.impl)
    raise ValueError(f"model.attention.kind={self.kind!r} is not implemented")

  def _alibi_slopes(self):
    return None if self.alibi is None else jnp.asarray(self.alibi, jnp.float32)
