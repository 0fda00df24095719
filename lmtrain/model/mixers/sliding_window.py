"""`sliding_window`: causal softmax attention over the last `window` tokens (local attention as in
Beltagy et al., 2020, "Longformer", and Child et al., 2019, "Sparse Transformers"; the window
of Mistral 7B, Jiang et al., 2023). Query t sees key s iff t - window < s <= t.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import pallas_kernels
from lmtrain.model.mixers import register
from lmtrain.model.mixers.softmax import SoftmaxFamily, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class SlidingWindowOptions(SoftmaxOptions):
  window: int | None = None  # None: data.seq_len // 4

  def resolve(self, seq_len):
    return self if self.window is not None else dataclasses.replace(self,
                                                                    window=max(seq_len // 4, 1))

  def validate(self, ctx):
    super().validate(ctx)
    ctx.positive(self, "window")


@register
class SlidingWindow(SoftmaxFamily):
  kind = "sliding_window"
  Options = SlidingWindowOptions
  paper = "Beltagy et al., 2020 (Longformer); Jiang et al., 2023 (Mistral 7B)"

  def attend(self, q, k, v, segment_ids):
    return pallas_kernels.sparse_attention(
        q, k, v, pattern=pallas_kernels.SlidingWindow(self.options.window), causal=True,
        segment_ids=segment_ids, alibi_slopes=self.alibi_slopes(), impl=self.impl,
        **self.options.attention_kwargs(self))

  # -- decoding: a ring buffer of the last `window` keys and values (memory independent of the
  # generated length) --------------------------------------------------------------------------

  def init_cache(self, batch, max_len):
    w = min(self.options.window, max_len)
    cache = super().init_cache(batch, w)
    cache["pos"] = jnp.full((batch, w), -1, jnp.int32)
    return cache

  def fill_cache(self, cache, k_BTKD, v_BTKD, lengths_B):
    w = cache["pos"].shape[1]
    t = k_BTKD.shape[1]
    s = jnp.arange(t)
    keep = (s[None] < lengths_B[:, None]) & (s[None] >= lengths_B[:, None] - w)  # [B, T]
    slot = jnp.broadcast_to(s % w, keep.shape)
    rows = jnp.broadcast_to(jnp.arange(keep.shape[0])[:, None], keep.shape)
    slot = jnp.where(keep, slot, w)  # out of range: dropped by the scatter
    put = lambda dst, src: dst.at[rows, slot].set(src.astype(dst.dtype), mode="drop")
    return {"k": put(cache["k"], k_BTKD), "v": put(cache["v"], v_BTKD),
            "pos": put(cache["pos"], jnp.broadcast_to(s, keep.shape))}

  def write_cache(self, cache, k_BKD, v_BKD, position_B):
    w = cache["pos"].shape[1]
    rows = jnp.arange(k_BKD.shape[0])
    slot = position_B % w
    return {"k": cache["k"].at[rows, slot].set(k_BKD.astype(cache["k"].dtype)),
            "v": cache["v"].at[rows, slot].set(v_BKD.astype(cache["v"].dtype)),
            "pos": cache["pos"].at[rows, slot].set(position_B)}

  def cache_entries(self, cache):
    return cache["k"], cache["v"], cache["pos"]

  def decode_mask(self, q_BHD, k_BSKD, key_pos_BS, position_B):
    near = position_B[:, None] - key_pos_BS < self.options.window
    return (super().decode_mask(q_BHD, k_BSKD, key_pos_BS, position_B) & near[:, None])

  @classmethod
  def sparse_pattern(cls, options):
    return "window", None

  @classmethod
  def pairs(cls, options, t):
    w = min(options.window, t)
    return w * (w + 1) / 2 + (t - w) * w
