"""`diff`: Differential attention (Ye et al., ICLR 2025, "Differential Transformer"), as in the
paper's `multihead_diffattn.py`:

  [Q1; Q2] = x W_q,  [K1; K2] = x W_k,  V = x W_v          (per differential head)
  A = softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d)),   out = A V
  lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 l)
  y = W_o concat_h((1 - lambda_init) RMSNorm(out_h))

for layer l (0-based here: the paper's l - 1). model.num_heads counts the q/k heads of the
baseline (the paper halves the head count: num_heads / 2 differential heads, each with two q/k
heads of head_dim and one value head of 2 * head_dim), so parameters and FLOPs match a softmax
model of the same config; num_kv_heads / 2 key pairs and value heads (GQA), one under MQA. The lambda vectors are normal(0, 0.1), one set per layer shared by its
heads; the per-head RMSNorm (eps 1e-5) has a learned scale. RoPE on every q/k head.

Both maps run as one blockwise_attention call with twice the differential heads: map-1 and
map-2 query heads side by side, each reading its own key heads, with q and k zero-padded to the
value's 2 * head_dim and the scale set to head_dim^-1/2 (exact).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from lmtrain.model import positions as pos
from lmtrain.model.layers import HeadRMSNorm, normal_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.base import Context, Mixer, MixerOptions
from lmtrain.config_error import ConfigError
from lmtrain.model.mixers.softmax import cached_attention
from pallas_kernels import capabilities


def lambda_init(layer: int) -> float:
  return 0.8 - 0.6 * math.exp(-0.3 * layer)


def kv_pairs(num_kv_heads: int) -> int:
  """Key pairs (and value heads): num_kv_heads / 2, and one pair under MQA (one k/v head)."""
  return max(num_kv_heads // 2, 1)


@dataclasses.dataclass(frozen=True)
class DiffOptions(MixerOptions):
  position: str = "rope"  # rope | none
  rope_theta: float = 10000.0

  def validate(self, ctx: Context) -> None:
    ctx.one_of(self, "position", ("rope", "none"))
    h, hkv = ctx.dims.num_heads, ctx.dims.num_kv_heads
    if h % 2 or (hkv > 1 and hkv % 2) or (h // 2) % kv_pairs(hkv):
      raise ConfigError(f"attention kind 'diff' pairs heads: model.num_heads={h} must be even "
                        f"and model.num_kv_heads={hkv} 1 or even, with its pairs dividing the "
                        "differential heads")
    if not self.rope_theta > 0:
      ctx.fail("rope_theta", self.rope_theta, "must be > 0")


@register
class Diff(Mixer):
  kind = "diff"
  Options = DiffOptions
  paper = "Ye et al., ICLR 2025 (Differential Transformer)"
  group = "softmax"
  kernel_families = ("blockwise",)

  def __init__(self, dims, options, *, layer: int, impl: str, out_std: float, rngs: nnx.Rngs):
    self.options, self.impl = options, impl
    # lambda_init of every layer as static numbers, indexed by the layer at run time (under
    # scan_layers a traced index): one code path, the same rounding whether scanned or not
    self.lambda_inits = tuple(lambda_init(i) for i in range(dims.num_layers))
    self.out_scales = tuple(1.0 - lambda_init(i) for i in range(dims.num_layers))
    self.layer = layer
    h, hkv, dh, d = dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.d_model
    dtype = dims.compute_dtype
    proj = lambda out, axes: nnx.LinearGeneral(d, out, use_bias=False, dtype=dtype,
                                               kernel_init=normal_init(axes), rngs=rngs)
    self.q_proj = proj((h, dh), ("embed", "heads", "head_dim"))  # pairs (2i, 2i + 1)
    self.k_proj = proj((2 * kv_pairs(hkv), dh), ("embed", "kv_heads", "head_dim"))
    self.v_proj = proj((kv_pairs(hkv), 2 * dh), ("embed", "kv_heads", "head_dim"))
    lam = lambda: nnx.Param(normal_init(("head_dim",), 0.1)(rngs.params(), (dh,)))
    self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = lam(), lam(), lam(), lam()
    self.subln = HeadRMSNorm(2 * dh, dtype=dtype, eps=1e-5, rngs=rngs)
    self.o_proj = nnx.LinearGeneral((h // 2, 2 * dh), d, axis=(-2, -1), use_bias=False,
                                    dtype=dtype, rngs=rngs,
                                    kernel_init=normal_init(("heads", "head_dim", "embed"),
                                                            out_std))

  def at_layer(self, layer) -> None:
    self.layer = layer

  def this_layer(self, table, dtype):
    """This layer's entry of a per-layer table, rounded from float64 to `dtype` (through fp32
    at least, as a Python float meeting a `dtype` array would be)."""
    ct = jnp.promote_types(dtype, jnp.float32)
    return jnp.asarray(table, ct)[self.layer].astype(dtype)

  def lam(self):
    ct = jnp.promote_types(self.lambda_q1[...].dtype, jnp.float32)
    dot = lambda a, b: jnp.sum(a[...].astype(ct) * b[...].astype(ct))
    return (jnp.exp(dot(self.lambda_q1, self.lambda_k1)) - jnp.exp(dot(self.lambda_q2,
                                                                       self.lambda_k2))
            + self.this_layer(self.lambda_inits, ct))

  def project(self, x_BTD, positions_BT):
    """q' [B, T, H, Dh] (map-1 heads, then map-2 heads), k' [B, T, Hkv, Dh] likewise, and
    v [B, T, Hkv/2, 2Dh]."""
    q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    if self.options.position == "rope":
      q = pos.apply_rope(q, positions_BT, theta=self.options.rope_theta)
      k = pos.apply_rope(k, positions_BT, theta=self.options.rope_theta)
    b, t = q.shape[:2]
    split = lambda a: jnp.concatenate([a[:, :, 0::2], a[:, :, 1::2]], axis=2)
    return split(q), split(k), v

  def combine(self, o_BTHD):
    """[B, T, H, 2Dh] (map-1 heads, then map-2 heads) -> differential heads -> W_o."""
    hd = o_BTHD.shape[2] // 2
    lam = self.lam().astype(o_BTHD.dtype)
    a = o_BTHD[:, :, :hd] - lam * o_BTHD[:, :, hd:]
    normed = self.subln(a)
    return self.o_proj(normed * self.this_layer(self.out_scales, normed.dtype))

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    q, k, v = self.project(x_BTD, positions_BT)
    return self.combine(self.attend(q, k, v, segment_ids_BT))

  def attend(self, q, k, v, segment_ids):
    dh = q.shape[-1]
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, dh)))
    vv = jnp.concatenate([v, v], axis=2)  # map-1 and map-2 key heads read the same values
    return pallas_kernels.blockwise_attention(pad(q), pad(k), vv, causal=True,
                                              segment_ids=segment_ids, sm_scale=dh ** -0.5,
                                              impl=self.impl)

  @classmethod
  def forward_flops(cls, options, dims, seq_len):
    # two maps of q.k over Dh per differential head, each times v over 2Dh: 6 H Dh per pair
    return 6.0 * dims.num_heads * dims.head_dim * seq_len * (seq_len + 1) / 2

  @classmethod
  def capability(cls, options, ctx):
    # both maps run as one call at twice the head dim (q and k zero-padded to the values')
    return capabilities.blockwise(ctx.impl, backend=ctx.backend, dtype=ctx.dtype,
                                  head_dim=2 * ctx.dims.head_dim)

  # -- decoding: the KV cache of both maps' keys and the values ------------------------------

  def init_cache(self, batch, max_len):
    dh = self.k_proj.kernel.shape[2]
    hkv = self.k_proj.kernel.shape[1]
    dtype = self.k_proj.dtype
    return {"k": jnp.zeros((batch, max_len, hkv, dh), dtype),
            "v": jnp.zeros((batch, max_len, hkv // 2, 2 * dh), dtype)}

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    q, k, v = self.project(x_BTD, positions_BT)
    y = self.combine(self.attend(q, k, v, segment_ids_BT))
    t = x_BTD.shape[1]
    return y, {"k": cache["k"].at[:, :t].set(k.astype(cache["k"].dtype)),
               "v": cache["v"].at[:, :t].set(v.astype(cache["v"].dtype))}

  def decode(self, x_BD, position_B, cache):
    q, k, v = self.project(x_BD[:, None], position_B[:, None])
    rows = jnp.arange(x_BD.shape[0])
    cache = {"k": cache["k"].at[rows, position_B].set(k[:, 0].astype(cache["k"].dtype)),
             "v": cache["v"].at[rows, position_B].set(v[:, 0].astype(cache["v"].dtype))}
    allowed = (jnp.arange(cache["k"].shape[1])[None, :] <= position_B[:, None])[:, None]
    vv = jnp.concatenate([cache["v"], cache["v"]], axis=2)
    o = cached_attention(q[:, 0], cache["k"], vv, allowed)
    return self.combine(o[:, None])[:, 0], cache
