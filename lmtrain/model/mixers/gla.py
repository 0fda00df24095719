"""`gla`: Gated Linear Attention (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), the layer of flash-linear-attention's `GatedLinearAttention`:

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T (q_t / sqrt(Dk))
  log a_t = log_sigmoid(x_t W_1 W_2 + b) / 16     (per key dimension; W_1 W_2 of rank 16)
  y_t = W_o (RMSNorm_head(o_t) * swish(x_t W_g))

Key dim per head = expand_k * head_dim (0.5), value dim = expand_v * head_dim (1.0). No feature
map, no normaliser, no positions; the short convolution is optional (off, as in fla). The
per-head output norm is RMSNorm (fla; the paper writes LayerNorm). The per-key-dimension gates
run on the chunked jnp form of pallas_kernels.linear_attention (the Pallas kernels take scalar
decay only, so `auto` never picks them for this kind and impl='pallas' is refused).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.layers import normal_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.linear import LinearFamily, LinearLayerOptions


@dataclasses.dataclass(frozen=True)
class GLAOptions(LinearLayerOptions):
  output_norm: bool = True
  output_gate: bool = True
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0

  def validate(self, ctx):
    super().validate(ctx)
    ctx.positive(self, "gate_low_rank_dim")
    if not self.gate_logit_normalizer >= 1:
      ctx.fail("gate_logit_normalizer", self.gate_logit_normalizer, "must be >= 1")
    for field in ("expand_k", "expand_v"):
      size = getattr(self, field) * ctx.dims.head_dim
      if size < 1 or size != int(size):
        ctx.fail(field, getattr(self, field), f"times the head dim {ctx.dims.head_dim} must be a "
                 "positive integer")


@register
class GLA(LinearFamily):
  kind = "gla"
  Options = GLAOptions
  paper = "Yang et al., 2024 (Gated Linear Attention Transformers)"

  @classmethod
  def head_dims(cls, dims, options):
    return int(dims.head_dim * options.expand_k), int(dims.head_dim * options.expand_v)

  def init_gates(self, dims, options, rngs):
    dk, _ = self.head_dims(dims, options)
    self.gate_down = nnx.Linear(dims.d_model, options.gate_low_rank_dim, use_bias=False,
                                dtype=dims.compute_dtype,
                                kernel_init=normal_init(("embed", None)), rngs=rngs)
    self.gate_up = nnx.LinearGeneral(
        options.gate_low_rank_dim, (dims.num_heads, dk), use_bias=True, dtype=dims.compute_dtype,
        kernel_init=normal_init((None, "heads", "head_dim")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("heads", "head_dim")),
        rngs=rngs)

  def log_gates(self, x_BTD):
    logits = self.gate_up(self.gate_down(x_BTD))  # [B, T, Hq, Dk]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # gates in fp32
    return jax.nn.log_sigmoid(logits) / self.options.gate_logit_normalizer

  def qk(self, q, k):
    return q * (q.shape[-1] ** -0.5), k

  @classmethod
  def forward_flops(cls, options, dims, seq_len):
    # the chunked form, plus the per-key-dimension decay inside the intra-chunk q.k
    dk, _ = cls.head_dims(dims, options)
    extra = seq_len * dims.num_heads * (options.chunk_size + 1) / 2 * dk
    return super().forward_flops(options, dims, seq_len) + extra

  per_dim_gates = True
