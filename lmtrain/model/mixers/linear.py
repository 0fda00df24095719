"""`linear`: causal linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"):
phi(x) = elu(x) + 1 on q and k, out_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s).
No positions (a rotation before a non-linear feature map would make scores depend on absolute
positions). Also the base of the other linear-family kinds (simple_gla, gla): the layer of
flash-linear-attention's `fla/layers` with its optional short convolution on q/k/v, per-head
output RMSNorm and swish output gate.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels import capabilities
from lmtrain.model.layers import HeadRMSNorm, ShortConv, normal_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.base import Context, Mixer, MixerOptions

FEATURE_MAPS = ("elu1", "relu", "identity")


@dataclasses.dataclass(frozen=True)
class LinearLayerOptions(MixerOptions):
  """What every linear-family layer may add around its recurrence (flash-linear-attention's
  layers): a short causal convolution (+ SiLU) on q, k and v, a per-head RMSNorm of the output
  and a swish output gate, norm(o) * swish(x W_g)."""
  chunk_size: int = 64  # chunk length of the chunked (training) form
  short_conv: bool = False
  conv_size: int = 4
  output_norm: bool = False
  output_gate: bool = False

  def validate(self, ctx: Context) -> None:
    ctx.positive(self, "chunk_size")
    if self.short_conv:
      ctx.positive(self, "conv_size")


class LinearFamily(Mixer):
  """q/k/v/o projections and the optional convolution, output norm and gate; subclasses choose
  the head sizes, the q/k transform, the gates and the normaliser."""
  group = "linear"
  kernel_families = ("linear",)
  feature_map: str = "identity"

  def __init__(self, dims, options, *, layer: int, impl: str, out_std: float, rngs: nnx.Rngs):
    del layer  # nothing here depends on the layer index
    self.options = options
    self.impl = impl
    d, h, hkv = dims.d_model, dims.num_heads, dims.num_kv_heads
    dk, dv = self.head_dims(dims, options)
    dtype = dims.compute_dtype
    self.dtype = dtype
    proj = lambda out, axes, std=0.02: nnx.LinearGeneral(
        d, out, use_bias=False, dtype=dtype, kernel_init=normal_init(axes, std), rngs=rngs)
    self.q_proj = proj((h, dk), ("embed", "heads", "head_dim"))
    self.k_proj = proj((hkv, dk), ("embed", "kv_heads", "head_dim"))
    self.v_proj = proj((hkv, dv), ("embed", "kv_heads", "head_dim"))
    if options.short_conv:
      conv = lambda heads, dim, axes: ShortConv((heads, dim), options.conv_size, axes,
                                                dtype=dtype, rngs=rngs)
      self.q_conv = conv(h, dk, ("heads", "head_dim"))
      self.k_conv = conv(hkv, dk, ("kv_heads", "head_dim"))
      self.v_conv = conv(hkv, dv, ("kv_heads", "head_dim"))
    if options.output_norm:
      self.o_norm = HeadRMSNorm(dv, dtype=dtype, rngs=rngs)
    if options.output_gate:
      self.g_proj = proj((h, dv), ("embed", "heads", "head_dim"))
    self.o_proj = nnx.LinearGeneral((h, dv), d, axis=(-2, -1), use_bias=False, dtype=dtype,
                                    kernel_init=normal_init(("heads", "head_dim", "embed"), out_std),
                                    rngs=rngs)
    self.init_gates(dims, options, rngs)

  # -- what subclasses choose -----------------------------------------------------------------

  @classmethod
  def head_dims(cls, dims, options) -> tuple[int, int]:
    """(key dim, value dim) per head."""
    return dims.head_dim, dims.head_dim

  def init_gates(self, dims, options, rngs) -> None:
    """Parameters of the decay / gates (none here)."""

  def log_gates(self, x_BTD):
    """None, [Hq], [B, T, Hq] or [B, T, Hq, Dk] log-decays (<= 0)."""
    return None

  def qk(self, q, k):
    """q and k as the recurrence reads them (before the kernel's feature map)."""
    return q, k

  @property
  def normalize(self) -> bool:
    return False

  # -- the layer ------------------------------------------------------------------------------

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    del positions_BT  # no positions: order comes from the recurrence (and the convolution)
    y, _ = self._forward(x_BTD, segment_ids_BT)
    return y

  def inputs(self, x_BTD, segment_ids_BT):
    """(q, k, v) as the recurrence reads them, and the raw projections (the convolutions'
    inputs, which decoding keeps a tail of)."""
    raw = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    q, k, v = raw
    if self.options.short_conv:
      q = self.q_conv(q, segment_ids_BT)
      k = self.k_conv(k, segment_ids_BT)
      v = self.v_conv(v, segment_ids_BT)
    else:
      q, k, v = self.activate(q, k, v)
    q, k = self.qk(q, k)
    return (q, k, v), raw

  def activate(self, q, k, v):
    """What stands in for the convolution's SiLU when there is no convolution (nothing here)."""
    return q, k, v

  def _forward(self, x_BTD, segment_ids_BT):
    (q, k, v), raw = self.inputs(x_BTD, segment_ids_BT)
    gates = self.log_gates(x_BTD)
    o = pallas_kernels.linear_attention(q, k, v, feature_map=self.feature_map, decay=gates,
                                        normalize=self.normalize,
                                        chunk_size=self.options.chunk_size,
                                        segment_ids=segment_ids_BT, impl=self.impl)
    return self.output(o, x_BTD), (raw, k, v, gates)

  # -- decoding: the recurrent state (and the convolutions' last inputs) ----------------------

  def init_cache(self, batch, max_len):
    del max_len  # constant memory: the state does not grow with the sequence
    h = self.q_proj.kernel.shape[1]
    dk, dv = self.q_proj.kernel.shape[2], self.v_proj.kernel.shape[2]
    ct = jnp.promote_types(self.dtype, jnp.float32)
    return {**pallas_kernels.linear_attention_init_state(batch, h, dk, dv, ct),
            **self.init_conv_tails(batch)}

  def init_conv_tails(self, batch) -> dict:
    if not self.options.short_conv:
      return {}
    return {f"{name}_tail": jnp.zeros((batch, self.options.conv_size - 1)
                                      + tuple(getattr(self, f"{name}_proj").kernel.shape[1:]),
                                      self.dtype)
            for name in ("q", "k", "v")}

  def conv_tails(self, raw, lengths_B) -> dict:
    """Each row's last conv_size - 1 convolution inputs before its length (oldest first)."""
    if not self.options.short_conv:
      return {}
    k_taps = self.options.conv_size - 1
    idx = lengths_B[:, None] - k_taps + jnp.arange(k_taps)[None]
    tails = {}
    for name, a in zip(("q", "k", "v"), raw):
      tail = jnp.take_along_axis(a, jnp.maximum(idx, 0)[:, :, None, None], axis=1)
      tails[f"{name}_tail"] = (tail * (idx >= 0)[:, :, None, None]).astype(self.dtype)
    return tails

  def decode_inputs(self, x_B1D, cache):
    """(q, k, v) [B, H, D] of one token, and the cache with the convolution tails advanced."""
    q, k, v = (p(x_B1D)[:, 0] for p in (self.q_proj, self.k_proj, self.v_proj))
    cache = dict(cache)
    if self.options.short_conv:
      q, cache["q_tail"] = self.q_conv.step(q, cache["q_tail"])
      k, cache["k_tail"] = self.k_conv.step(k, cache["k_tail"])
      v, cache["v_tail"] = self.v_conv.step(v, cache["v_tail"])
    else:
      q, k, v = self.activate(q, k, v)
    q, k = self.qk(q, k)
    return (q, k, v), cache

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    """The training forward; the state after each row's prompt in closed form
    (pallas_kernels.linear_attention_state), the convolutions' last inputs gathered."""
    del positions_BT
    y, (raw, k, v, gates) = self._forward(x_BTD, segment_ids_BT)
    state = pallas_kernels.linear_attention_state(
        k, v, num_heads=self.q_proj.kernel.shape[1], feature_map=self.feature_map, decay=gates,
        lengths=lengths_B)
    return y, {**cache, "S": state["S"].astype(cache["S"].dtype),
               "z": state["z"].astype(cache["z"].dtype), **self.conv_tails(raw, lengths_B)}

  def decode(self, x_BD, position_B, cache):
    del position_B
    x = x_BD[:, None]
    (q, k, v), cache = self.decode_inputs(x, cache)
    gates = self.log_gates(x)
    if gates is not None and gates.ndim >= 3:
      gates = gates[:, 0]
    state, o = pallas_kernels.linear_attention_step(
        {"S": cache["S"], "z": cache["z"]}, q, k, v, feature_map=self.feature_map, decay=gates,
        normalize=self.normalize)
    cache["S"], cache["z"] = state["S"], state["z"]
    return self.output(o[:, None], x)[:, 0], cache

  def output(self, o_BTHD, x_BTD):
    """Output norm and gate, then the output projection."""
    if self.options.output_norm:
      o_BTHD = self.o_norm(o_BTHD)
    if self.options.output_gate:
      o_BTHD = o_BTHD * jax.nn.silu(self.g_proj(x_BTD).astype(o_BTHD.dtype))
    return self.o_proj(o_BTHD.astype(self.dtype))

  # -- declarations ---------------------------------------------------------------------------

  per_dim_gates: bool = False  # gates per key dimension (GLA): the jnp chunked form only

  @classmethod
  def capability(cls, options, ctx):
    dk, _ = cls.head_dims(ctx.dims, options)
    return capabilities.linear(ctx.impl, backend=ctx.backend, dtype=ctx.dtype, head_dim=dk,
                               chunk_size=options.chunk_size, per_dim_gates=cls.per_dim_gates)

  @classmethod
  def forward_flops(cls, options, dims, seq_len: int) -> float:
    # per token and head, chunked form: the causal half of the C x C intra-chunk products (q.k
    # over Dk, scores.v over Dv), the state read and the state update (Dk x Dv each)
    dk, dv = cls.head_dims(dims, options)
    c = options.chunk_size
    return seq_len * dims.num_heads * ((c + 1) * (dk + dv) + 4 * dk * dv)


@dataclasses.dataclass(frozen=True)
class LinearOptions(LinearLayerOptions):
  feature_map: str = "elu1"  # elu1 | relu | identity
  normalize: bool = True  # divide by sum_s phi(q_t).phi(k_s) (the paper's form)

  def validate(self, ctx):
    super().validate(ctx)
    ctx.one_of(self, "feature_map", FEATURE_MAPS)
    if self.feature_map == "identity" and self.normalize:
      ctx.fail("feature_map", self.feature_map,
               "with normalize=True divides by a sum that can be zero or negative; use elu1 "
               "or relu, or set normalize=False")


@register
class Linear(LinearFamily):
  kind = "linear"
  Options = LinearOptions
  paper = "Katharopoulos et al., 2020 (Transformers are RNNs)"

  def __init__(self, dims, options, **kwargs):
    self.feature_map = options.feature_map
    super().__init__(dims, options, **kwargs)

  @property
  def normalize(self):
    return self.options.normalize

  @classmethod
  def ready_variants(cls):
    # a hybrid stack: three linear layers to one softmax layer, repeated over the depth
    return {"linear": {}, "hybrid": {"layer_pattern": "linear,linear,linear,softmax"}}
