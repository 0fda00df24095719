"""`simple_gla`: linear attention with one data-dependent scalar decay per head and token
(the scalar gating of Mamba-2, Dao & Gu, 2024, "Transformers are SSMs", applied to linear
attention as in Yang et al., 2024, "Gated Linear Attention Transformers"; the layer of
flash-linear-attention's `SimpleGatedLinearAttention`):

  S_t = a_t S_{t-1} + k_t v_t^T,  o_t = S_t^T (q_t / sqrt(Dk)),  log a_t = log_sigmoid(x_t w + b) / 16

with a SiLU short convolution on q, k and v, a per-head output RMSNorm and a swish output gate.
No feature map, no normaliser (the output norm does that job), no positions.
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
class SimpleGLAOptions(LinearLayerOptions):
  short_conv: bool = True
  output_norm: bool = True
  output_gate: bool = True
  gate_logit_normalizer: float = 16.0  # log a_t = log_sigmoid(.) / this (fla's default)

  def validate(self, ctx):
    super().validate(ctx)
    if not self.gate_logit_normalizer >= 1:
      ctx.fail("gate_logit_normalizer", self.gate_logit_normalizer, "must be >= 1")


@register
class SimpleGLA(LinearFamily):
  kind = "simple_gla"
  Options = SimpleGLAOptions
  paper = ("Dao & Gu, 2024 (Mamba-2: Transformers are SSMs); Yang et al., 2024 (Gated Linear "
           "Attention), scalar-gate form")

  def init_gates(self, dims, options, rngs):
    self.gate_proj = nnx.Linear(dims.d_model, dims.num_heads, use_bias=True,
                                dtype=dims.compute_dtype,
                                kernel_init=normal_init(("embed", "heads")),
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                                ("heads",)),
                                rngs=rngs)

  def log_gates(self, x_BTD):
    logits = self.gate_proj(x_BTD)  # [B, T, Hq]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # gates in fp32
    return jax.nn.log_sigmoid(logits) / self.options.gate_logit_normalizer

  def qk(self, q, k):
    return q * (q.shape[-1] ** -0.5), k
