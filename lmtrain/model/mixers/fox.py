"""`fox`: the Forgetting Transformer (Lin et al., ICLR 2025, "Forgetting Transformer: Softmax
Attention with a Forget Gate"): softmax attention whose logits carry a data-dependent decay,

  f_t = sigmoid(x_t w_h + b_h)    (one forget gate per head and token)
  logit(i, j) = q_i . k_j / sqrt(d) + sum_{l = j+1 .. i} log f_l,

on pallas_kernels.blockwise_attention's `log_gates` (the bias c_i - c_j of the cumulative log
gates, reset at each packed document). No RoPE by default (the paper's FoX; position='rope'
turns it on). The gate weights are normal(0, 0.02) and the bias 0 (the paper's default "full"
gate).

FoX (Pro), the paper's strongest block, adds four options, each off by default and all on in
the `fox_pro` variant (configs/tiny.py:attention=fox_pro), as the authors' layer has them:

  qk_norm      RMSNorm of q and k per head (one scale [Dh] shared by the heads, as in the
               paper's experiments);
  kv_shift     the data-dependent key/value shift, k~_t = a_t k_{t-1} + (1 - a_t) k_t with
               a_t = sigmoid(x_t w) per key/value head (no bias, weights normal(0, 0.02)), the
               same for v with its own w, applied to the projections before QK-norm; k_{-1} = 0,
               and no shift across a packed document's start (an lmtrain extension);
  output_norm  RMSNorm of the attention output per head, one scale per head and channel
               (eps 1e-6), before the output gate;
  output_gate  o * sigmoid(x W_g).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels import capabilities
from lmtrain.model.layers import normal_init, ones_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.softmax import SoftmaxFamily, SoftmaxOptions, cached_attention


@dataclasses.dataclass(frozen=True)
class FoXOptions(SoftmaxOptions):
  position: str = "none"  # the paper's FoX has no RoPE; rope | none
  kv_shift: bool = False  # FoX (Pro)'s data-dependent key/value shift
  output_norm: bool = False  # FoX (Pro)'s per-head RMSNorm of the attention output

  def validate(self, ctx):
    super().validate(ctx)
    if self.position == "alibi":
      ctx.fail("position", self.position, "is itself a (constant) forget gate; use rope or none")


@register
class FoX(SoftmaxFamily):
  kind = "fox"
  Options = FoXOptions
  paper = "Lin et al., ICLR 2025 (Forgetting Transformer: Softmax Attention with a Forget Gate)"
  group = "softmax"
  kernel_families = ("blockwise",)

  def __init__(self, dims, options, **kwargs):
    super().__init__(dims, options, **kwargs)
    rngs = kwargs["rngs"]
    self.f_proj = nnx.Linear(dims.d_model, dims.num_heads, use_bias=True,
                             dtype=dims.compute_dtype, kernel_init=normal_init(("embed", "heads")),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                             ("heads",)),
                             rngs=rngs)
    if options.kv_shift:
      shift = lambda: nnx.Linear(dims.d_model, dims.num_kv_heads, use_bias=False,
                                 dtype=dims.compute_dtype,
                                 kernel_init=normal_init(("embed", "kv_heads")), rngs=rngs)
      self.k_shift_proj, self.v_shift_proj = shift(), shift()
    if options.output_norm:
      self.o_norm_scale = nnx.Param(ones_init(("heads", "head_dim"))(
          rngs.params(), (dims.num_heads, self.value_dim(dims)), jnp.float32))

  @classmethod
  def ready_variants(cls):
    pro = {"qk_norm": True, "kv_shift": True, "output_norm": True, "output_gate": True}
    return {"fox": {}, "fox_pro": {"options": {"fox": pro}}}

  # -- FoX (Pro)'s key/value shift and output norm -------------------------------------------

  def project_shifted(self, x_BTD, positions_BT, segment_ids_BT, prev_kv=None):
    """q, k, v as `project`, with the key/value shift when on (before QK-norm and RoPE).
    prev_kv: the previous token's unshifted (k, v) [B, Hkv, Dh] when decoding, else None (the
    token before each row is 0). Returns (q, k, v, the unshifted (k, v))."""
    q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    raw = (k, v)
    if self.options.kv_shift:
      k = shift_tokens(k, self.k_shift_proj(x_BTD), segment_ids_BT,
                       None if prev_kv is None else prev_kv[0])
      v = shift_tokens(v, self.v_shift_proj(x_BTD), segment_ids_BT,
                       None if prev_kv is None else prev_kv[1])
    q, k, v = self.normalise_and_rotate(q, k, v, positions_BT)
    return q, k, v, raw

  def finish(self, o_BTHD, x_BTD):
    if self.options.output_norm:
      o32 = o_BTHD.astype(jnp.promote_types(o_BTHD.dtype, jnp.float32))
      o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + 1e-6)
      o_BTHD = (o32 * self.o_norm_scale[...]).astype(o_BTHD.dtype)
    return super().finish(o_BTHD, x_BTD)

  def log_forget(self, x_BTD):
    """log f [B, T, Hq] in fp32 (<= 0)."""
    logits = self.f_proj(x_BTD)
    return jax.nn.log_sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    q, k, v, _ = self.project_shifted(x_BTD, positions_BT, segment_ids_BT)
    return self.finish(self.attend_gated(q, k, v, self.log_forget(x_BTD), segment_ids_BT), x_BTD)

  def attend_gated(self, q, k, v, log_f, segment_ids):
    return pallas_kernels.blockwise_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                              log_gates=log_f, impl=self.impl,
                                              **self.options.attention_kwargs(self))

  @classmethod
  def pairs(cls, options, t):
    return t * (t + 1) / 2

  @classmethod
  def forward_flops(cls, options, dims, seq_len):
    # softmax attention's, plus the gate bias (one subtraction and add) per pair and head
    return (4.0 * dims.head_dim + 2.0) * dims.num_heads * cls.pairs(options, seq_len)

  @classmethod
  def capability(cls, options, ctx):
    return capabilities.blockwise(ctx.impl, backend=ctx.backend, dtype=ctx.dtype,
                                  head_dim=ctx.dims.head_dim, gated=True,
                                  extras=options.extras())

  # -- decoding: the KV cache plus the cumulative log gate of every cached position (and, with
  # the key/value shift, the previous token's unshifted key and value) -----------------------

  def init_cache(self, batch, max_len):
    cache = super().init_cache(batch, max_len)
    cache["c"] = jnp.zeros((batch, max_len, self.f_proj.kernel.shape[1]), jnp.float32)
    if self.options.kv_shift:
      cache["k_prev"] = jnp.zeros((batch,) + cache["k"].shape[2:], cache["k"].dtype)
      cache["v_prev"] = jnp.zeros((batch,) + cache["v"].shape[2:], cache["v"].dtype)
    return cache

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    q, k, v, (k_raw, v_raw) = self.project_shifted(x_BTD, positions_BT, segment_ids_BT)
    log_f = self.log_forget(x_BTD)
    y = self.finish(self.attend_gated(q, k, v, log_f, segment_ids_BT), x_BTD)
    t = x_BTD.shape[1]
    c = jnp.cumsum(log_f, axis=1).astype(jnp.float32)  # one document per row, from position 0
    cache = {**cache, **self.fill_cache(cache, k, v, lengths_B), "c": cache["c"].at[:, :t].set(c)}
    if self.options.kv_shift:  # each row's last prompt token, unshifted
      rows, last = jnp.arange(x_BTD.shape[0]), jnp.maximum(lengths_B - 1, 0)
      cache["k_prev"] = k_raw[rows, last].astype(cache["k_prev"].dtype)
      cache["v_prev"] = v_raw[rows, last].astype(cache["v_prev"].dtype)
    return y, cache

  def decode(self, x_BD, position_B, cache):
    prev_kv = None
    if self.options.kv_shift:  # position 0 has no previous token
      first = (position_B == 0)[:, None, None]
      prev_kv = tuple(jnp.where(first, 0.0, cache[n]) for n in ("k_prev", "v_prev"))
    q, k, v, (k_raw, v_raw) = self.project_shifted(
        x_BD[:, None], position_B[:, None], jnp.ones((x_BD.shape[0], 1), jnp.int32), prev_kv)
    rows = jnp.arange(x_BD.shape[0])
    prev = jnp.where((position_B > 0)[:, None],
                     cache["c"][rows, jnp.maximum(position_B - 1, 0)], 0.0)  # [B, H]
    c_t = prev + self.log_forget(x_BD[:, None])[:, 0].astype(jnp.float32)  # [B, H]
    c = cache["c"].at[rows, position_B].set(c_t)
    cache = {**cache, **self.write_cache(cache, k[:, 0], v[:, 0], position_B), "c": c}
    if self.options.kv_shift:
      cache["k_prev"], cache["v_prev"] = (a[:, 0].astype(cache["k_prev"].dtype)
                                          for a in (k_raw, v_raw))
    keys, values, key_pos = self.cache_entries(cache)
    bias = c_t[:, :, None] - jnp.moveaxis(c, 1, 2)  # c_t - c_s: [B, H, S]
    allowed = self.decode_mask(q[:, 0], keys, key_pos, position_B)
    bias = jnp.where(allowed, bias, 0.0)
    o = cached_attention(q[:, 0], keys, values, allowed, bias=bias,
                         **self.options.attention_kwargs(self))
    return self.finish(o[:, None], x_BD[:, None])[:, 0], cache


def shift_tokens(x_BTHD, logits_BTH, segment_ids_BT, prev_BHD=None):
  """FoX (Pro)'s shift: a_t x_{t-1} + (1 - a_t) x_t with a_t = sigmoid(logits) per head; the
  token before the first is prev_BHD (decoding) or 0, and a packed document's first token has
  no previous token."""
  before = jnp.zeros_like(x_BTHD[:, :1]) if prev_BHD is None else prev_BHD[:, None].astype(
      x_BTHD.dtype)
  prev = jnp.concatenate([before, x_BTHD[:, :-1]], axis=1)
  if segment_ids_BT is not None:
    same = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                            segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]], axis=1)
    prev = jnp.where(same[:, :, None, None], prev, 0.0)
  f32 = jnp.promote_types(x_BTHD.dtype, jnp.float32)  # mixed in fp32, cast once
  a = jax.nn.sigmoid(logits_BTH.astype(f32))[..., None]
  return (a * prev.astype(f32) + (1 - a) * x_BTHD.astype(f32)).astype(x_BTHD.dtype)
