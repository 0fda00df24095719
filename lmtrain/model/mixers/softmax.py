"""`softmax`: causal softmax attention (Vaswani et al., 2017, "Attention Is All You Need"), and
the base of every softmax-family kind (projections, positions, the options they share).

Positions: RoPE (Su et al., 2021, "RoFormer"), ALiBi (Press et al., 2022, "Train Short, Test
Long") or none. GQA/MQA by model.num_kv_heads. Options every softmax-family kind has, off by
default:
  - qk_norm: RMSNorm of q and k per head (learned scale [Dh], eps 1e-6) before RoPE, as in
    Qwen3 / OLMo 2 (Dehghani et al., 2023, "Scaling Vision Transformers to 22B", for the idea);
  - output_gate: o * sigmoid(x W_g) per head and channel before the output projection, the
    gated attention of Qwen3-Next (Qiu et al., 2025, "Gated Attention for Large Language
    Models");
  - sinks: a learned logit per head in every softmax denominator, a key with no value (gpt-oss,
    OpenAI 2025; Xiao et al., 2024, "Efficient Streaming Language Models with Attention
    Sinks"), initialised to 0;
  - softcap: logits capped as softcap * tanh(q.k / sqrt(d) / softcap) (Gemma 2, Gemma Team,
    2024; 50 there), 0 = off.
Soft-capping and sinks run on the jnp paths of pallas_kernels (the kernels refuse them).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels import capabilities
from pallas_kernels.blockwise.reference import cap, softmax_with_sinks
from lmtrain.model import positions as pos
from lmtrain.model.layers import HeadRMSNorm, normal_init
from lmtrain.model.mixers import register
from lmtrain.model.mixers.base import Context, Mixer, MixerOptions

POSITIONS = ("rope", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions(MixerOptions):
  position: str = "rope"  # rope | alibi | none
  rope_theta: float = 10000.0
  qk_norm: bool = False  # RMSNorm of q and k per head, before RoPE
  output_gate: bool = False  # o * sigmoid(x W_g), per head and channel
  sinks: bool = False  # a learned sink logit per head in the softmax denominator
  softcap: float = 0.0  # cap * tanh(logit / cap); 0 = off

  def validate(self, ctx: Context) -> None:
    ctx.one_of(self, "position", POSITIONS)
    if self.position == "rope" and ctx.dims.head_dim % 2:
      ctx.fail("position", self.position, f"needs an even head dim; got {ctx.dims.head_dim}")
    if not self.rope_theta > 0:
      ctx.fail("rope_theta", self.rope_theta, "must be > 0")
    if not self.softcap >= 0:
      ctx.fail("softcap", self.softcap, "must be >= 0 (0 = off)")

  def extras(self) -> bool:
    """Options only the jnp attention paths take."""
    return self.sinks or bool(self.softcap)

  def attention_kwargs(self, mixer) -> dict:
    """softcap / sinks for pallas_kernels (empty when off, so every impl takes the call)."""
    out = {}
    if self.softcap:
      out["softcap"] = self.softcap
    if self.sinks:
      out["sinks"] = mixer.sink_logits[...]  # the kernels compute in fp32 (fp64 for fp64)
    return out


class SoftmaxFamily(Mixer):
  """q/k/v/o projections and positions; subclasses say which pairs attend (`attend`, `pairs`)."""
  group = "sparse"
  kernel_families = ("sparse",)

  def __init__(self, dims, options, *, layer: int, impl: str, out_std: float, rngs: nnx.Rngs):
    del layer  # nothing here depends on the layer index
    self.options = options
    self.impl = impl
    h, hkv, dh, d = dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.d_model
    proj = lambda out, axes: nnx.LinearGeneral(d, out, use_bias=False, dtype=dims.compute_dtype,
                                               kernel_init=normal_init(axes), rngs=rngs)
    self.q_proj = proj((h, dh), ("embed", "heads", "head_dim"))
    self.k_proj = proj((hkv, dh), ("embed", "kv_heads", "head_dim"))
    self.v_proj = proj((hkv, dh), ("embed", "kv_heads", "head_dim"))
    self.o_proj = nnx.LinearGeneral((h, dh), d, axis=(-2, -1), use_bias=False,
                                    dtype=dims.compute_dtype,
                                    kernel_init=normal_init(("heads", "head_dim", "embed"), out_std),
                                    rngs=rngs)
    self.alibi = (tuple(pos.alibi_slopes(h).tolist()) if options.position == "alibi" else None)
    if options.qk_norm:
      self.q_norm = HeadRMSNorm(dh, dtype=dims.compute_dtype, eps=1e-6, rngs=rngs)
      self.k_norm = HeadRMSNorm(dh, dtype=dims.compute_dtype, eps=1e-6, rngs=rngs)
    if options.output_gate:
      self.g_proj = proj((h, self.value_dim(dims)), ("embed", "heads", "head_dim"))
    if options.sinks:
      self.sink_logits = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                         ("heads",))(rngs.params(), (h,)))

  def value_dim(self, dims) -> int:
    return dims.head_dim

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    q, k, v = self.project(x_BTD, positions_BT)
    return self.finish(self.attend(q, k, v, segment_ids_BT), x_BTD)

  def finish(self, o_BTHD, x_BTD):
    """The output gate (when on), then the output projection."""
    if self.options.output_gate:
      o_BTHD = o_BTHD * jax.nn.sigmoid(self.g_proj(x_BTD)).astype(o_BTHD.dtype)
    return self.o_proj(o_BTHD)

  def project(self, x_BTD, positions_BT):
    """q [B, T, Hq, Dh], k and v [B, T, Hkv, Dh], normalised and rotated as the options say."""
    q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    return self.normalise_and_rotate(q, k, v, positions_BT)

  def normalise_and_rotate(self, q, k, v, positions_BT):
    """QK-norm, then RoPE, as the options say (the second half of `project`)."""
    if self.options.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.options.position == "rope":
      q = pos.apply_rope(q, positions_BT, theta=self.options.rope_theta)
      k = pos.apply_rope(k, positions_BT, theta=self.options.rope_theta)
    return q, k, v

  def alibi_slopes(self):
    return None if self.alibi is None else jnp.asarray(self.alibi, jnp.float32)

  def attend(self, q, k, v, segment_ids):
    raise NotImplementedError

  # -- decoding: a KV cache of the key/value heads (GQA: never the query heads) ----------------

  def init_cache(self, batch: int, max_len: int):
    shape = (batch, max_len, self.k_proj.kernel.shape[1], self.k_proj.kernel.shape[2])
    dtype = self.k_proj.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def prefill(self, x_BTD, positions_BT, segment_ids_BT, lengths_B, cache):
    """The training forward over right-padded prompts; the cache keeps their keys and values
    (entries at and after each row's length are overwritten by decoding)."""
    q, k, v = self.project(x_BTD, positions_BT)
    y = self.finish(self.attend(q, k, v, segment_ids_BT), x_BTD)
    return y, self.fill_cache(cache, k, v, lengths_B)

  def fill_cache(self, cache, k_BTKD, v_BTKD, lengths_B):
    del lengths_B
    t = k_BTKD.shape[1]
    return {"k": cache["k"].at[:, :t].set(k_BTKD.astype(cache["k"].dtype)),
            "v": cache["v"].at[:, :t].set(v_BTKD.astype(cache["v"].dtype))}

  def write_cache(self, cache, k_BKD, v_BKD, position_B):
    rows = jnp.arange(k_BKD.shape[0])
    return {"k": cache["k"].at[rows, position_B].set(k_BKD.astype(cache["k"].dtype)),
            "v": cache["v"].at[rows, position_B].set(v_BKD.astype(cache["v"].dtype))}

  def cache_entries(self, cache):
    """(k [B, S, Hkv, D], v, key positions [B, S], -1 where empty)."""
    k = cache["k"]
    return k, cache["v"], jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])

  def decode_mask(self, q_BHD, k_BSKD, key_pos_BS, position_B):
    """Which cache entries the token at position_B attends, [B, Hq, S] (or [B, 1, S])."""
    return ((key_pos_BS >= 0) & (key_pos_BS <= position_B[:, None]))[:, None]

  def decode(self, x_BD, position_B, cache):
    q, k, v = self.project(x_BD[:, None], position_B[:, None])
    cache = self.write_cache(cache, k[:, 0], v[:, 0], position_B)
    keys, values, key_pos = self.cache_entries(cache)
    o = self.decode_attention(q[:, 0], keys, values, key_pos, position_B)
    return self.finish(o[:, None], x_BD[:, None])[:, 0], cache

  def decode_attention(self, q_BHD, k_BSKD, v_BSKD, key_pos_BS, position_B, bias=None):
    """One query per row over the cache entries the kind allows."""
    if self.alibi is not None:
      dist = (position_B[:, None] - key_pos_BS).astype(jnp.float32)
      alibi = -self.alibi_slopes()[None, :, None] * dist[:, None]
      bias = alibi if bias is None else bias + alibi
    allowed = self.decode_mask(q_BHD, k_BSKD, key_pos_BS, position_B)
    return cached_attention(q_BHD, k_BSKD, v_BSKD, allowed, bias=bias,
                            **self.options.attention_kwargs(self))

  # -- declarations ---------------------------------------------------------------------------

  @classmethod
  def pairs(cls, options, t: int) -> float:
    """Query-key pairs a causal sequence of length t needs under this kind's pattern."""
    raise NotImplementedError

  @classmethod
  def forward_flops(cls, options, dims, seq_len: int) -> float:
    # q.k and p.v: 2 FLOPs per multiply-add, head_dim each, per attended pair and head; a
    # soft-cap adds a division, a tanh and a product per pair
    per_pair = 4.0 * dims.head_dim + (3.0 if options.softcap else 0.0)
    return per_pair * dims.num_heads * cls.pairs(options, seq_len)

  @classmethod
  def sparse_pattern(cls, options) -> tuple[str, int | None]:
    """(pattern name, block size) for pallas_kernels.capabilities.sparse."""
    raise NotImplementedError

  @classmethod
  def capability(cls, options, ctx: Context) -> str | None:
    pattern, block_size = cls.sparse_pattern(options)
    return capabilities.sparse(ctx.impl, backend=ctx.backend, dtype=ctx.dtype,
                               head_dim=ctx.dims.head_dim, pattern=pattern,
                               block_size=block_size, alibi=options.position == "alibi",
                               extras=options.extras())


@register
class Softmax(SoftmaxFamily):
  """Full causal softmax attention on pallas_kernels.blockwise_attention (ring attention when
  the mesh shards the sequence)."""
  kind = "softmax"
  Options = SoftmaxOptions
  paper = "Vaswani et al., 2017 (Attention Is All You Need)"
  group = "softmax"
  kernel_families = ("blockwise",)

  def attend(self, q, k, v, segment_ids):
    mesh = jax.sharding.get_abstract_mesh()
    from lmtrain.ring_attention import SEQUENCE_AXIS, ring_attention
    if not mesh.empty and mesh.shape.get(SEQUENCE_AXIS, 1) > 1:
      # context parallelism: the trainer laid the sequence out zigzag over the sequence axis
      return ring_attention(q, k, v, segment_ids, mesh=mesh)
    return pallas_kernels.blockwise_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                              alibi_slopes=self.alibi_slopes(), impl=self.impl,
                                              **self.options.attention_kwargs(self))

  @classmethod
  def pairs(cls, options, t: int) -> float:
    return t * (t + 1) / 2

  @classmethod
  def ready_variants(cls):
    # ALiBi (Press et al., 2022) instead of RoPE: the extrapolation baseline FoX is compared with
    return {"softmax": {}, "alibi": {"options": {"softmax": {"position": "alibi"}}}}

  @classmethod
  def extra_impls(cls):
    return ("cudnn",)

  @classmethod
  def capability(cls, options, ctx: Context) -> str | None:
    return capabilities.blockwise(ctx.impl, backend=ctx.backend, dtype=ctx.dtype,
                                  head_dim=ctx.dims.head_dim, gated=options.position == "alibi",
                                  extras=options.extras())

  @classmethod
  def sequence_parallel_error(cls, options):
    if options.position == "alibi":
      return "ring attention does not take model.attention.softmax.position='alibi'"
    if options.extras():
      return "ring attention does not take model.attention.softmax.softcap or sinks"
    return None


def cached_attention(q_BHD, k_BSKD, v_BSKD, allowed_BHS, *, bias=None, scale=None,
                     softcap=None, sinks=None):
  """Softmax attention of one query per row over S cached keys (GQA groups of query heads share
  a key/value head), fp32 logits; `allowed` and `bias` broadcast to [B, Hq, S]; softcap and
  sinks [Hq] as in pallas_kernels.blockwise_attention. Returns [B, Hq, Dv] in q's dtype."""
  b, hq, d = q_BHD.shape
  hkv, dv = k_BSKD.shape[2], v_BSKD.shape[-1]
  ct = jnp.promote_types(q_BHD.dtype, jnp.float32)
  scale = d ** -0.5 if scale is None else scale
  qg = q_BHD.reshape(b, hkv, hq // hkv, d).astype(ct)
  logits = jnp.einsum("bkgd,bskd->bkgs", qg, k_BSKD.astype(ct)).reshape(b, hq, -1) * scale
  logits = cap(logits, softcap)
  if bias is not None:
    logits = logits + bias.astype(ct)
  sink = None if sinks is None else sinks.astype(ct)[None, :]
  p = softmax_with_sinks(logits, jnp.broadcast_to(allowed_BHS, logits.shape), sink)
  o = jnp.einsum("bkgs,bskd->bkgd", p.reshape(b, hkv, hq // hkv, -1), v_BSKD.astype(ct))
  return o.reshape(b, hq, dv).astype(q_BHD.dtype)
