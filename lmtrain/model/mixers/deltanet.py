"""`deltanet`: DeltaNet (Yang et al., NeurIPS 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; the delta rule of Schlag et al., 2021), the layer of
flash-linear-attention's `DeltaNet`:

  q, k, v = SiLU(ShortConv(x W)),   q, k L2-normalised,   b_t = sigmoid(x_t w_b)
  S_t = S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = S_t^T q_t / sqrt(Dk)
  y_t = W_o RMSNorm_head(o_t)

(the state written [Dk, Dv] as pallas_kernels.delta stores it). The short convolution is on by
default (SiLU after it; without it, SiLU alone); per-head output RMSNorm (eps 1e-5), no output
gate by default. No positions. GQA: beta and the state belong to the key/value heads. Also the
base of `gated_deltanet`.
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
from lmtrain.model.mixers.linear import LinearFamily, LinearLayerOptions


def l2_normalize(x, eps: float = 1e-6):
  """x / sqrt(sum x^2 + eps) over the last axis, in fp32 (as fla's kernels)."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DeltaNetOptions(LinearLayerOptions):
  short_conv: bool = True
  output_norm: bool = True
  output_gate: bool = False


@register
class DeltaNet(LinearFamily):
  kind = "deltanet"
  Options = DeltaNetOptions
  paper = "Yang et al., NeurIPS 2024 (Parallelizing Linear Transformers with the Delta Rule)"
  kernel_families = ("delta",)

  def init_gates(self, dims, options, rngs):
    self.b_proj = nnx.LinearGeneral(dims.d_model, dims.num_kv_heads, use_bias=False,
                                    dtype=dims.compute_dtype,
                                    kernel_init=normal_init(("embed", "kv_heads")), rngs=rngs)

  def activate(self, q, k, v):
    return jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)

  def qk(self, q, k):
    q = l2_normalize(q)
    return q * (q.shape[-1] ** -0.5), l2_normalize(k)

  def beta(self, x):
    logits = self.b_proj(x)
    return jax.nn.sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))

  def delta_gates(self, x):
    """Log-decays a_t [B, T, Hkv] of the gated rule; None: the plain delta rule."""
    return None

  def _forward(self, x_BTD, segment_ids_BT):
    (q, k, v), raw = self.inputs(x_BTD, segment_ids_BT)
    o = pallas_kernels.delta_rule(q, k, v, self.beta(x_BTD), log_gates=self.delta_gates(x_BTD),
                                  segment_ids=segment_ids_BT, chunk_size=self.options.chunk_size,
                                  impl=self.impl)
    return self.output(o, x_BTD), raw

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    del positions_BT
    return self._forward(x_BTD, segment_ids_BT)[0]

  @classmethod
  def capability(cls, options, ctx):
    return capabilities.delta(ctx.impl)

  @classmethod
  def forward_flops(cls, options, dims, seq_len):
    # chunked WY form per token and head: the intra-chunk products (K K^T, Q K^T over Dk and
    # their products with V over Dv: causal halves of C x C), the UT transform's solve (C^2 / 2
    # per token over Dk), the state read, the state correction W S and the update (Dk x Dv each)
    dk, dv = cls.head_dims(dims, options)
    c = options.chunk_size
    return seq_len * dims.num_heads * ((c + 1) * (2 * dk + dv) + c * dk + 6 * dk * dv)

  # -- decoding: the state and the convolutions' tails ----------------------------------------

  def init_cache(self, batch, max_len):
    del max_len
    hkv = self.k_proj.kernel.shape[1]
    dk, dv = self.k_proj.kernel.shape[2], self.v_proj.kernel.shape[2]
    ct = jnp.promote_types(self.dtype, jnp.float32)
    return {"S": pallas_kernels.delta_rule_init_state(batch, hkv, dk, dv, ct),
            **self.init_conv_tails(batch)}

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    """The training forward over right-padded prompts in one call: the padding gets beta 0 and
    gate 0, so it leaves the state as each row's prompt left it."""
    del positions_BT
    (q, k, v), raw = self.inputs(x_BTD, segment_ids_BT)
    valid = (jnp.arange(x_BTD.shape[1])[None, :] < lengths_B[:, None])[..., None]
    beta = jnp.where(valid, self.beta(x_BTD), 0.0)
    gates = self.delta_gates(x_BTD)
    if gates is not None:
      gates = jnp.where(valid, gates, 0.0)
    o, state = pallas_kernels.delta_rule(q, k, v, beta, log_gates=gates,
                                         chunk_size=self.options.chunk_size,
                                         return_state=True, impl=self.impl)
    return self.output(o, x_BTD), {"S": state.astype(cache["S"].dtype),
                                   **self.conv_tails(raw, lengths_B)}

  def decode(self, x_BD, position_B, cache):
    del position_B
    x = x_BD[:, None]
    (q, k, v), cache = self.decode_inputs(x, cache)
    gates = self.delta_gates(x)
    state, o = pallas_kernels.delta_rule_step(cache["S"], q, k, v, self.beta(x)[:, 0],
                                              None if gates is None else gates[:, 0])
    cache["S"] = state
    return self.output(o[:, None], x)[:, 0], cache
