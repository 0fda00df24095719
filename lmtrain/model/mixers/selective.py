"""`selective`: Selective Attention (Leviathan, Kalman & Matias, 2024, "Selective Attention
Improves Transformer"), parameter-free. Head 0's scaled, causal logits select what later tokens
should stop attending to:

  S = ReLU(logits of head 0),  S[:, bos] = 0,  S[i, i] = 0
  F[i, j] = sum_{k < i} S[k, j]                   (accumulated over earlier queries)
  logits_h -= F                                   for every head h, head 0 included

The BOS token (the first token of each packed document) is never masked, nor a token by its own
selection. Computed as an O(T^2) jnp path that materialises the [T, T] logits (there is no
blockwise kernel for it yet: impl reference/xla/auto all run it; explicit Pallas impls are
refused). Decoding keeps F's running sum per cached key, so it is exact and O(T) per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.model.mixers import register
from lmtrain.model.mixers.softmax import SoftmaxFamily, SoftmaxOptions, cached_attention
from pallas_kernels._common import group_queries, segment_starts
from pallas_kernels.blockwise.reference import cap, softmax_with_sinks


def selection(logits0_BTS, keep_BTS, starts_BT):
  """F [B, T, S] from head 0's logits: ReLU where attended, never a document's first token nor
  the diagonal, summed over earlier queries (exclusive)."""
  t = logits0_BTS.shape[1]
  s_ = jnp.where(keep_BTS, jax.nn.relu(logits0_BTS), 0.0)
  key = jnp.arange(t)
  bos = key[None, None, :] == starts_BT[:, :, None]  # key j is the query's document start
  s_ = jnp.where(bos | (key[None, :, None] == key[None, None, :]), 0.0, s_)
  return jnp.cumsum(s_, axis=1) - s_  # sum over k < i


@register
class Selective(SoftmaxFamily):
  kind = "selective"
  Options = SoftmaxOptions
  paper = "Leviathan, Kalman & Matias, 2024 (Selective Attention Improves Transformer)"
  group = "softmax"
  kernel_families = ()

  def attend(self, q, k, v, segment_ids):
    b, t, hq, d = q.shape
    ct = jnp.promote_types(q.dtype, jnp.float32)
    hkv = k.shape[2]
    logits = cap(jnp.einsum("btkgd,bskd->bkgts", group_queries(q, hkv).astype(ct),
                            k.astype(ct)).reshape(b, hq, t, t) * d ** -0.5, self.options.softcap)
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    keep = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    if self.alibi is not None:
      dist = (jnp.arange(t)[:, None] - jnp.arange(t)[None, :]).astype(ct)
      logits = logits - self.alibi_slopes().astype(ct)[None, :, None, None] * dist
    f = selection(logits[:, 0], keep, segment_starts(seg))
    sinks = self.options.attention_kwargs(self).get("sinks")
    sink = None if sinks is None else sinks.astype(ct)[None, :, None]
    p = softmax_with_sinks(logits - f[:, None], keep[:, None], sink)
    o = jnp.einsum("bkgts,bskd->btkgd", p.reshape(b, hkv, hq // hkv, t, t), v.astype(ct))
    return o.reshape(b, t, hq, -1).astype(q.dtype)

  @classmethod
  def pairs(cls, options, t):
    return t * (t + 1) / 2

  @classmethod
  def forward_flops(cls, options, dims, seq_len):
    # softmax attention's, plus the selection (ReLU, cumulative sum, subtraction) per pair
    return (4.0 * dims.num_heads * dims.head_dim + 3.0) * cls.pairs(options, seq_len)

  @classmethod
  def capability(cls, options, ctx):
    return "it runs an O(T^2) jnp path, no kernel (impl auto, xla or reference run it)"

  # -- decoding: the KV cache plus F's running sum per cached key ----------------------------

  def init_cache(self, batch, max_len):
    cache = super().init_cache(batch, max_len)
    cache["f"] = jnp.zeros((batch, max_len), jnp.float32)
    return cache

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    q, k, v = self.project(x_BTD, positions_BT)
    y = self.finish(self.attend(q, k, v, segment_ids_BT), x_BTD)
    cache = {**self.fill_cache(cache, k, v, lengths_B), "f": cache["f"]}
    # F after the prompt: every prompt query's selection, summed (queries past the prompt are
    # padding and contribute nothing)
    b, t = x_BTD.shape[:2]
    logits0 = cap(jnp.einsum("btd,bsd->bts", q[:, :, 0].astype(jnp.float32),
                             k[:, :, 0].astype(jnp.float32)) * q.shape[-1] ** -0.5,
                  self.options.softcap)
    if self.alibi is not None:
      logits0 = logits0 - self.alibi[0] * (jnp.arange(t)[:, None] - jnp.arange(t)[None, :])
    valid = jnp.arange(t)[None, :] < lengths_B[:, None]
    keep = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, :, None] & valid[:, None, :]
    f_all = selection(logits0, keep, jnp.zeros((b, t), jnp.int32))  # F for query t
    last = jnp.take_along_axis(f_all, (lengths_B - 1)[:, None, None], axis=1)[:, 0]  # [B, S]
    s_last = jnp.where(keep, jax.nn.relu(logits0), 0.0)
    key = jnp.arange(t)
    s_last = jnp.where((key[None, None, :] == 0) | (key[None, :, None] == key[None, None, :]),
                       0.0, s_last)
    s_last = jnp.take_along_axis(s_last, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    cache["f"] = cache["f"].at[:, :t].set(last + s_last)  # F of the next query
    return y, cache

  def decode(self, x_BD, position_B, cache):
    q, k, v = self.project(x_BD[:, None], position_B[:, None])
    f = cache["f"]
    cache = {**self.write_cache(cache, k[:, 0], v[:, 0], position_B), "f": f}
    keys, values, key_pos = self.cache_entries(cache)
    allowed = self.decode_mask(q[:, 0], keys, key_pos, position_B)  # [B, 1, S]
    bias = -f[:, None, :]
    if self.alibi is not None:
      dist = (position_B[:, None] - key_pos).astype(jnp.float32)
      bias = bias - self.alibi_slopes()[None, :, None] * dist[:, None]
    o = cached_attention(q[:, 0], keys, values, allowed, bias=bias,
                         **self.options.attention_kwargs(self))
    # this query's selection joins F for the queries after it
    logit0 = cap(jnp.einsum("bd,bsd->bs", q[:, 0, 0].astype(jnp.float32),
                            keys[:, :, 0].astype(jnp.float32)) * q.shape[-1] ** -0.5,
                 self.options.softcap)
    if self.alibi is not None:
      logit0 = logit0 - self.alibi[0] * (position_B[:, None] - key_pos)
    sel = jnp.where(allowed[:, 0] & (key_pos > 0) & (key_pos != position_B[:, None]),
                    jax.nn.relu(logit0), 0.0)
    cache["f"] = f + sel
    return self.finish(o[:, None], x_BD[:, None])[:, 0], cache
