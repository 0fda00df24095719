"""The decoder-only Transformer: embed, L pre-norm blocks (attention + SwiGLU), norm, logits."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model import mixers
from lmtrain.model import positions as pos
from lmtrain.model.dims import ModelDims
from lmtrain.model.layers import INIT_STD, SwiGLU, dropout, normal_init, rms_norm


def mixer_options(attn_cfg, kind: str):
  """The resolved options of `kind` from model.attention.<kind> (see lmtrain.config.finalize)."""
  options = mixers.get(kind).Options.from_config(attn_cfg.get(kind))
  unresolved = [f for f, v in options.to_dict().items() if v is None]
  if unresolved:
    raise ValueError(f"model.attention.{kind}.{unresolved[0]} is unresolved: build the model from "
                     "a config passed through lmtrain.config.finalize")
  return options


class Block(nnx.Module):
  """x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is the layer's attention kind."""

  def __init__(self, dims: ModelDims, attn_cfg, layer: int, *, rngs: nnx.Rngs):
    out_std = INIT_STD / math.sqrt(2 * dims.num_layers)  # GPT-2 scaling of residual writes
    kind = dims.layer_kinds[layer]
    self.attn_norm = rms_norm(dims.d_model, dims, rngs)
    self.attn = mixers.get(kind)(dims, mixer_options(attn_cfg, kind), layer=layer,
                                 impl=attn_cfg.impl, out_std=out_std, rngs=rngs)
    self.mlp_norm = rms_norm(dims.d_model, dims, rngs)
    self.mlp = SwiGLU(dims, out_std=out_std, rngs=rngs)
    self.dropout_rate = dims.dropout_rate

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, rng=None):
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    h = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
    x_BTD = x_BTD + dropout(h, self.dropout_rate, rngs[0])
    h = self.mlp(self.mlp_norm(x_BTD))
    return x_BTD + dropout(h, self.dropout_rate, rngs[1])

  def mlp_residual(self, x):
    """x + mlp(norm(x)) without dropout (decoding)."""
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """model(tokens [B, T] int32, segment_ids [B, T] or None) -> logits [B, T, V] float32."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dims = ModelDims.from_config(cfg)
    self.dims = dims
    self.embed = nnx.Embed(dims.vocab_size, dims.d_model, dtype=dims.compute_dtype,
                           embedding_init=normal_init(("vocab", "embed")), rngs=rngs)
    self.blocks = nnx.List([Block(dims, cfg.attention, i, rngs=rngs)
                            for i in range(dims.num_layers)])
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
    return self.logits(x)

  def logits(self, x_BTD):
    x = self.final_norm(x_BTD)
    if self.dims.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.unembed(x)
    return logits.astype(jnp.float32)

  # -- decoding (lmtrain.generate): each mixer owns its cache --------------------------------

  def init_cache(self, batch: int, max_len: int) -> list:
    return [block.attn.init_cache(batch, max_len) for block in self.blocks]

  def prefill(self, tokens_BT, lengths_B, cache):
    """Right-padded prompts (row b's tokens are tokens[b, :lengths[b]]) through the training
    forward, filling the caches: (logits [B, T, V], cache)."""
    t = tokens_BT.shape[1]
    valid = jnp.arange(t)[None, :] < lengths_B[:, None]
    segment_ids = valid.astype(jnp.int32)  # the padding is a segment of its own (id 0)
    positions = jnp.broadcast_to(jnp.arange(t), tokens_BT.shape)
    x = self.embed(tokens_BT)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      h, layer_cache = block.attn.prefill(block.attn_norm(x), positions, segment_ids, lengths_B,
                                          layer_cache)
      x = block.mlp_residual(x + h)
      new_cache.append(layer_cache)
    return self.logits(x), new_cache

  def decode(self, token_B, position_B, cache):
    """One token per row at position_B (its index in the row): (logits [B, V], cache)."""
    x = self.embed(token_B)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      h, layer_cache = block.attn.decode(block.attn_norm(x), position_B, layer_cache)
      x = block.mlp_residual(x + h)
      new_cache.append(layer_cache)
    return self.logits(x), new_cache
