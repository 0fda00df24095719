"""The decoder-only Transformer: embed, L pre-norm blocks (attention + SwiGLU), norm, logits."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model import positions as pos
from lmtrain.model.attention import Attention
from lmtrain.model.layers import INIT_STD, SwiGLU, dropout, normal_init, rms_norm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """The resolved numbers of the `model` config subtree (head_dim derived, dtype resolved)."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  position: str
  rope_theta: float
  tie_embeddings: bool
  compute_dtype: jnp.dtype
  dropout_rate: float
  layer_kinds: tuple[str, ...]

  @classmethod
  def from_config(cls, cfg) -> "ModelDims":
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    return cls(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, d_model=cfg.d_model,
               num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=head_dim,
               mlp_dim=cfg.mlp_dim, position=cfg.position, rope_theta=cfg.rope_theta,
               tie_embeddings=cfg.tie_embeddings, compute_dtype=DTYPES[cfg.dtype],
               dropout_rate=cfg.dropout_rate, layer_kinds=layer_kinds(cfg))


def layer_kinds(cfg) -> tuple[str, ...]:
  """The attention kind of each layer: attention.layer_pattern repeated over the depth."""
  pattern = cfg.attention.layer_pattern
  if not pattern:
    return (cfg.attention.kind,) * cfg.num_layers
  kinds = [p.strip() for p in pattern.split(",")]
  return tuple(kinds[i % len(kinds)] for i in range(cfg.num_layers))


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, dims: ModelDims, attn_cfg, kind: str, *, rngs: nnx.Rngs):
    out_std = INIT_STD / math.sqrt(2 * dims.num_layers)  # GPT-2 scaling of residual writes
    self.attn_norm = rms_norm(dims.d_model, dims, rngs)
    self.attn = Attention(dims, attn_cfg, kind, out_std=out_std, rngs=rngs)
    self.mlp_norm = rms_norm(dims.d_model, dims, rngs)
    self.mlp = SwiGLU(dims, out_std=out_std, rngs=rngs)
    self.dropout_rate = dims.dropout_rate

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, rng=None):
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    h = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
    x_BTD = x_BTD + dropout(h, self.dropout_rate, rngs[0])
    h = self.mlp(self.mlp_norm(x_BTD))
    return x_BTD + dropout(h, self.dropout_rate, rngs[1])


class Transformer(nnx.Module):
  """model(tokens [B, T] int32, segment_ids [B, T] or None) -> logits [B, T, V] float32."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dims = ModelDims.from_config(cfg)
    self.dims = dims
    self.embed = nnx.Embed(dims.vocab_size, dims.d_model, dtype=dims.compute_dtype,
                           embedding_init=normal_init(("vocab", "embed")), rngs=rngs)
    self.blocks = nnx.List([Block(dims, cfg.attention, kind, rngs=rngs)
                            for kind in dims.layer_kinds])
    self.final_norm = rms_norm(dims.d_model, dims, rngs)
    if not dims.tie_embeddings:
      self.unembed = nnx.Linear(dims.d_model, dims.vocab_size, use_bias=False,
                                dtype=dims.compute_dtype,
                                kernel_init=normal_init(("embed", "vocab")), rngs=rngs)

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, dropout_rng=None):
    if positions_BT is None:
      positions_BT = (pos.positions_from_segments(segment_ids_BT) if segment_ids_BT is not None
                      else jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape))
    x = self.embed(tokens_BT)
    for i, block in enumerate(self.blocks):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      x = block(x, positions_BT, segment_ids_BT, rng)
    x = self.final_norm(x)
    if self.dims.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.unembed(x)
    return logits.astype(jnp.float32)
