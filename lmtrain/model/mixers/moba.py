"""`moba`: Mixture of Block Attention (Lu et al., 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs"). Keys are cut into blocks; query t attends to its own block (causally) and
the top_k - 1 past blocks whose mean-pooled key scores highest against q_t, per head.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import pallas_kernels
from lmtrain.model.mixers import register
from lmtrain.model.mixers.softmax import SoftmaxFamily, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class MoBAOptions(SoftmaxOptions):
  block_size: int | None = None  # None: data.seq_len // 8
  top_k: int = 3  # blocks per query, its own included

  def resolve(self, seq_len):
    if self.block_size is not None:
      return self
    return dataclasses.replace(self, block_size=max(seq_len // 8, 1))

  def validate(self, ctx):
    super().validate(ctx)
    ctx.positive(self, "block_size", "top_k")


@register
class MoBA(SoftmaxFamily):
  kind = "moba"
  Options = MoBAOptions
  paper = "Lu et al., 2025 (MoBA: Mixture of Block Attention)"

  def attend(self, q, k, v, segment_ids):
    pattern = pallas_kernels.MoBA(self.options.block_size, self.options.top_k)
    return pallas_kernels.sparse_attention(q, k, v, pattern=pattern, causal=True,
                                           segment_ids=segment_ids,
                                           alibi_slopes=self.alibi_slopes(), impl=self.impl,
                                           **self.options.attention_kwargs(self))

  def decode_mask(self, q_BHD, k_BSKD, key_pos_BS, position_B):
    """The own block up to the query, plus the top_k - 1 past blocks whose mean key scores
    highest against q (per head), as the training routing picks them."""
    bs, top_k = self.options.block_size, self.options.top_k
    b, hq, d = q_BHD.shape
    s_len, hkv = k_BSKD.shape[1], k_BSKD.shape[2]
    nb = -(-s_len // bs)
    ct = jnp.promote_types(q_BHD.dtype, jnp.float32)
    k = jnp.pad(k_BSKD.astype(ct), ((0, 0), (0, nb * bs - s_len), (0, 0), (0, 0)))
    means = k.reshape(b, nb, bs, hkv, d).mean(axis=2)  # complete past blocks only are read
    qg = q_BHD.reshape(b, hkv, hq // hkv, d).astype(ct)
    scores = jnp.einsum("bkgd,bjkd->bkgj", qg, means).reshape(b, hq, nb)
    own = position_B // bs  # [B]
    past = jnp.arange(nb)[None, :] < own[:, None]  # [B, nb]
    scores = jnp.where(past[:, None], scores, -jnp.inf)
    chosen = jnp.zeros((b, hq, nb), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(hq)[None, :, None], own[:, None, None]].set(True)
    if top_k > 1 and nb > 1:
      values, picks = jax.lax.top_k(scores, min(top_k - 1, nb))
      hit = (picks[..., None] == jnp.arange(nb)) & jnp.isfinite(values)[..., None]
      chosen = chosen | jnp.any(hit, axis=-2)
    key_block = jnp.maximum(key_pos_BS, 0) // bs  # [B, S]
    in_chosen = jnp.take_along_axis(chosen, jnp.broadcast_to(key_block[:, None], (b, hq, s_len)),
                                    axis=-1)
    return super().decode_mask(q_BHD, k_BSKD, key_pos_BS, position_B) & in_chosen

  @classmethod
  def sparse_pattern(cls, options):
    return "moba", options.block_size

  @classmethod
  def pairs(cls, options, t):
    bs, k = options.block_size, options.top_k
    pairs = 0.0
    for blk in range(math.ceil(t / bs)):
      n = min(bs, t - blk * bs)
      pairs += n * (n + 1) / 2 + n * min(k - 1, blk) * bs
    return pairs
