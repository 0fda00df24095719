"""`fox`: the Forgetting Transformer (Lin et al., ICLR 2025, "Forgetting Transformer: Softmax
Attention with a Forget Gate"): softmax attention whose logits carry a data-dependent decay,

  f_t = sigmoid(x_t w_h + b_h)    (one forget gate per head and token)
  logit(i, j) = q_i . k_j / sqrt(d) + sum_{l = j+1 .. i} log f_l,

on pallas_kernels.blockwise_attention's `log_gates` (the bias c_i - c_j of the cumulative log
gates, reset at each packed document). No RoPE by default (the paper's FoX; position='rope'
turns it on). The gate weights are normal(0, 0.02) and the bias 0 (the paper's default "full"
gate). FoX "Pro" adds QK-norm and an output gate (options qk_norm, output_gate here) and an
output norm and KV-shift, which are not implemented.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels import capabilities
from lmtrain.model.layers import normal_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.softmax import SoftmaxFamily, SoftmaxOptions, cached_attention


@dataclasses.dataclass(frozen=True)
class FoXOptions(SoftmaxOptions):
  position: str = "none"  # the paper's FoX has no RoPE; rope | none

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
    self.f_proj = nnx.Linear(dims.d_model, dims.num_heads, use_bias=True,
                             dtype=dims.compute_dtype, kernel_init=normal_init(("embed", "heads")),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                             ("heads",)),
                             rngs=kwargs["rngs"])

  def log_forget(self, x_BTD):
    """log f [B, T, Hq] in fp32 (<= 0)."""
    logits = self.f_proj(x_BTD)
    return jax.nn.log_sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    q, k, v = self.project(x_BTD, positions_BT)
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

  # -- decoding: the KV cache plus the cumulative log gate of every cached position -----------

  def init_cache(self, batch, max_len):
    cache = super().init_cache(batch, max_len)
    cache["c"] = jnp.zeros((batch, max_len, self.f_proj.kernel.shape[1]), jnp.float32)
    return cache

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    q, k, v = self.project(x_BTD, positions_BT)
    log_f = self.log_forget(x_BTD)
    y = self.finish(self.attend_gated(q, k, v, log_f, segment_ids_BT), x_BTD)
    t = x_BTD.shape[1]
    c = jnp.cumsum(log_f, axis=1).astype(jnp.float32)  # one document per row, from position 0
    return y, {**self.fill_cache(cache, k, v, lengths_B), "c": cache["c"].at[:, :t].set(c)}

  def decode(self, x_BD, position_B, cache):
    q, k, v = self.project(x_BD[:, None], position_B[:, None])
    rows = jnp.arange(x_BD.shape[0])
    prev = jnp.where((position_B > 0)[:, None],
                     cache["c"][rows, jnp.maximum(position_B - 1, 0)], 0.0)  # [B, H]
    c_t = prev + self.log_forget(x_BD[:, None])[:, 0].astype(jnp.float32)  # [B, H]
    c = cache["c"].at[rows, position_B].set(c_t)
    cache = {**self.write_cache(cache, k[:, 0], v[:, 0], position_B), "c": c}
    keys, values, key_pos = self.cache_entries(cache)
    bias = c_t[:, :, None] - jnp.moveaxis(c, 1, 2)  # c_t - c_s: [B, H, S]
    allowed = self.decode_mask(q[:, 0], keys, key_pos, position_B)
    bias = jnp.where(allowed, bias, 0.0)
    o = cached_attention(q[:, 0], keys, values, allowed, bias=bias,
                         **self.options.attention_kwargs(self))
    return self.finish(o[:, None], x_BD[:, None])[:, 0], cache
