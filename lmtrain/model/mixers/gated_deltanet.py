"""`gated_deltanet`: Gated DeltaNet (Yang et al., ICLR 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"), the layer of flash-linear-attention's `GatedDeltaNet`:

  S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = S_t^T q_t / sqrt(Dk)
  a_t = exp(-exp(A_log) * softplus(x_t w_a + dt_bias))      (Mamba-2's decay, per head)
  y_t = W_o (RMSNorm_head(o_t) * swish(x_t W_g))

with DeltaNet's SiLU short convolutions and L2-normalised q, k, beta = sigmoid(x w_b), and a
value dim of expand_v (2) x head_dim. Initialisation as Mamba-2 / fla: A = U(0, 16) (A_log its
log), dt = exp(U(log 1e-3, log 0.1)) floored at 1e-4, dt_bias = softplus^-1(dt); both are
vectors, so AdamW leaves them without weight decay.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.layers import normal_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.deltanet import DeltaNet, DeltaNetOptions

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetOptions(DeltaNetOptions):
  output_gate: bool = True
  expand_v: float = 2.0  # value dim per head = expand_v * head_dim

  def validate(self, ctx):
    super().validate(ctx)
    size = self.expand_v * ctx.dims.head_dim
    if size < 1 or size != int(size):
      ctx.fail("expand_v", self.expand_v, f"times the head dim {ctx.dims.head_dim} must be a "
               "positive integer")


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, dtype, 0.0, 16.0))


def _dt_bias_init(key, shape, dtype=jnp.float32):
  u = jax.random.uniform(key, shape, dtype)
  dt = jnp.maximum(jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)),
                   DT_FLOOR)
  return dt + jnp.log(-jnp.expm1(-dt))  # softplus(dt_bias) = dt


@register
class GatedDeltaNet(DeltaNet):
  kind = "gated_deltanet"
  Options = GatedDeltaNetOptions
  paper = "Yang et al., ICLR 2025 (Gated Delta Networks: Improving Mamba2 with Delta Rule)"

  @classmethod
  def ready_variants(cls):
    # the hybrids of Qwen3-Next and Kimi Linear: three Gated DeltaNet layers to one softmax
    return {"gated_deltanet": {},
            "hybrid_gdn": {"layer_pattern": "gated_deltanet,gated_deltanet,gated_deltanet,softmax"}}

  @classmethod
  def head_dims(cls, dims, options):
    return dims.head_dim, int(dims.head_dim * options.expand_v)

  def init_gates(self, dims, options, rngs):
    super().init_gates(dims, options, rngs)
    hkv = dims.num_kv_heads
    self.a_proj = nnx.LinearGeneral(dims.d_model, hkv, use_bias=False, dtype=dims.compute_dtype,
                                    kernel_init=normal_init(("embed", "kv_heads")), rngs=rngs)
    self.A_log = nnx.Param(nnx.with_partitioning(_a_log_init, ("kv_heads",))(rngs.params(),
                                                                            (hkv,)))
    self.dt_bias = nnx.Param(nnx.with_partitioning(_dt_bias_init, ("kv_heads",))(rngs.params(),
                                                                                (hkv,)))

  def delta_gates(self, x):
    a = self.a_proj(x)
    ct = jnp.promote_types(a.dtype, jnp.float32)
    return (-jnp.exp(self.A_log[...].astype(ct))
            * jax.nn.softplus(a.astype(ct) + self.dt_bias[...].astype(ct)))
