"""The decoder-only Transformer: embed, L pre-norm blocks (attention + SwiGLU), norm, logits.

The blocks run one of two ways, with the same numbers:
  - a Python loop over `blocks`, each layer its own parameters (the default);
  - with scan_layers, one lax.scan over `stack`: the layer pattern's repeating group of blocks
    with every parameter stacked over the groups ([G, ...], logical axis "layers"), so the
    compiled program does not grow with the depth; layers left over when the depth is not a
    multiple of the pattern (`tail`) run after it, unscanned (lmtrain.model.stack).
`remat` names what each block keeps for the backward pass (lmtrain.model.stack.REMAT_POLICIES):
the block is wrapped in jax.checkpoint with that policy.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model import chunks, mixers
from lmtrain.model import positions as pos
from lmtrain.model import stack as stack_lib
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

  def __init__(self, dims: ModelDims, attn_cfg, layer: int, *, rngs: nnx.Rngs,
               mlp_chunk: int = 0):
    """mlp_chunk: run the MLP (and its norm) over chunks of this many tokens per row, each
    recomputed in the backward pass (0: the whole sequence at once)."""
    out_std = INIT_STD / math.sqrt(2 * dims.num_layers)  # GPT-2 scaling of residual writes
    kind = dims.layer_kinds[layer]
    self.attn_norm = rms_norm(dims.d_model, dims, rngs)
    self.attn = mixers.get(kind)(dims, mixer_options(attn_cfg, kind), layer=layer,
                                 impl=attn_cfg.impl, out_std=out_std, rngs=rngs)
    self.mlp_norm = rms_norm(dims.d_model, dims, rngs)
    self.mlp = SwiGLU(dims, out_std=out_std, rngs=rngs)
    self.dropout_rate = dims.dropout_rate
    self.mlp_chunk = mlp_chunk

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, rng=None):
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    h = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
    x_BTD = x_BTD + dropout(h, self.dropout_rate, rngs[0])
    # per token: over chunks, one layer's backward holds one chunk of the [B, T, mlp_dim] hidden
    h = chunks.map_tokens(lambda x: self.mlp(self.mlp_norm(x)), (x_BTD,), self.mlp_chunk)
    return x_BTD + dropout(h, self.dropout_rate, rngs[1])

  def at_layer(self, layer) -> None:
    """The layer this block computes (an int, or a traced int32 scalar under scan_layers)."""
    self.attn.at_layer(layer)

  def mlp_residual(self, x):
    """x + mlp(norm(x)) without dropout (decoding)."""
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """model(tokens [B, T] int32, segment_ids [B, T] or None) -> logits [B, T, V] float32.

  scan_layers: run the blocks as one scan over stacked parameters (the params tree then has
  `stack` and maybe `tail` instead of `blocks`; lmtrain.model.stack converts between them).
  remat: "none", "full" or "dots" (lmtrain.model.stack.REMAT_POLICIES); under "full" the MLP
  is recomputed over chunks of `mlp_chunk` tokens (0: the whole sequence). None of these
  changes the parameters' values: the same key initialises the same weights either way.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, scan_layers: bool = False, remat: str = "none",
               mlp_chunk: int = 0):
    dims = ModelDims.from_config(cfg)
    if remat not in stack_lib.REMAT_POLICIES:
      raise ValueError(f"remat={remat!r} is not one of {', '.join(stack_lib.REMAT_POLICIES)}")
    self.dims = dims
    self.remat = remat
    self.scan_layers = scan_layers
    self.embed = nnx.Embed(dims.vocab_size, dims.d_model, dtype=dims.compute_dtype,
                           embedding_init=normal_init(("vocab", "embed")), rngs=rngs)
    # the MLP over chunks of tokens where its recompute is part of the policy anyway
    mlp_chunk = mlp_chunk if remat == "full" else 0
    blocks = [Block(dims, cfg.attention, i, rngs=rngs, mlp_chunk=mlp_chunk)
              for i in range(dims.num_layers)]
    if scan_layers:
      period, groups, _ = stack_lib.scan_groups(dims.layer_kinds)
      self.stack = nnx.List([stack_lib.stack_blocks(blocks[p:groups * period:period], p)
                             for p in range(period)])
      if len(blocks) > groups * period:
        self.tail = nnx.List(blocks[groups * period:])
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = rms_norm(dims.d_model, dims, rngs)
    if not dims.tie_embeddings:
      self.unembed = nnx.Linear(dims.d_model, dims.vocab_size, use_bias=False,
                                dtype=dims.compute_dtype,
                                kernel_init=normal_init(("embed", "vocab")), rngs=rngs)

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, dropout_rng=None):
    return self.logits(self.hidden(tokens_BT, segment_ids_BT, positions_BT,
                                   dropout_rng=dropout_rng))

  def hidden(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, dropout_rng=None):
    """The residual stream after the last block, before the final norm: [B, T, D]. The loss
    turns it into logits chunk by chunk (lmtrain.model.loss)."""
    if positions_BT is None:
      positions_BT = (pos.positions_from_segments(segment_ids_BT) if segment_ids_BT is not None
                      else jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape))
    run = functools.partial(_run_block, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                            dropout_rng=dropout_rng)
    if self.remat != "none":
      # inside a scan, common subexpressions cannot be merged across iterations anyway
      run = jax.checkpoint(run, static_argnums=(0,), prevent_cse=not self.scan_layers,
                           policy=stack_lib.REMAT_POLICIES[self.remat])
    x, _ = self._over_layers(self.embed(tokens_BT),
                             lambda gd, state, x, layer, cache: (run(gd, state, x, layer), None))
    return x

  def logits(self, x_BTD):
    """Final norm and output projection of any [..., D]: [..., V] float32."""
    x = self.final_norm(x_BTD)
    if self.dims.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.unembed(x)
    return logits.astype(jnp.float32)

  def _over_layers(self, x, step, caches=None):
    """x through every layer in order: step(graphdef, state, x, layer, cache) -> (x, cache),
    with `layer` an int (unscanned) or a traced int32 (scanned). Returns (x, caches) with the
    caches in the model's layout (a list per layer, or {"stack", "tail"})."""
    if not self.scan_layers:
      new = []
      for i, block in enumerate(self.blocks):
        gd, state = nnx.split(block)
        x, c = step(gd, state, x, i, None if caches is None else caches[i])
        new.append(c)
      return x, new
    split = [nnx.split(m) for m in self.stack]
    period = len(split)
    groups = jax.tree.leaves(split[0][1])[0].shape[0]

    def group(x, inputs):
      states, group_caches, g = inputs
      out = []
      for p, (gd, _) in enumerate(split):
        x, c = step(gd, states[p], x, g * period + p,
                    None if group_caches is None else group_caches[p])
        out.append(c)
      return x, out

    x, stack_caches = jax.lax.scan(
        group, x, ([s for _, s in split], None if caches is None else caches["stack"],
                   jnp.arange(groups, dtype=jnp.int32)))
    tail_caches = []
    for r, block in enumerate(getattr(self, "tail", ())):
      gd, state = nnx.split(block)
      x, c = step(gd, state, x, groups * period + r,
                  None if caches is None else caches["tail"][r])
      tail_caches.append(c)
    return x, {"stack": stack_caches, "tail": tail_caches}

  # -- decoding (lmtrain.generate): each mixer owns its cache --------------------------------

  def init_cache(self, batch: int, max_len: int):
    """Per layer (a list), or {"stack": per place in the pattern, stacked over the groups,
    "tail": per leftover layer} under scan_layers."""
    if not self.scan_layers:
      return [block.attn.init_cache(batch, max_len) for block in self.blocks]
    stacked = []
    for m in self.stack:
      gd, state = nnx.split(m)
      groups = jax.tree.leaves(state)[0].shape[0]
      one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state)
      cache = nnx.merge(gd, one).attn.init_cache(batch, max_len)
      stacked.append(jax.tree.map(lambda c: jnp.broadcast_to(c, (groups, *c.shape)), cache))
    return {"stack": stacked,
            "tail": [block.attn.init_cache(batch, max_len) for block in getattr(self, "tail", ())]}

  def prefill(self, tokens_BT, lengths_B, cache):
    """Right-padded prompts (row b's tokens are tokens[b, :lengths[b]]) through the training
    forward, filling the caches: (logits [B, T, V], cache)."""
    t = tokens_BT.shape[1]
    valid = jnp.arange(t)[None, :] < lengths_B[:, None]
    segment_ids = valid.astype(jnp.int32)  # the padding is a segment of its own (id 0)
    positions = jnp.broadcast_to(jnp.arange(t), tokens_BT.shape)

    def step(gd, state, x, layer, layer_cache):
      block = nnx.merge(gd, state)
      block.at_layer(layer)
      h, layer_cache = block.attn.prefill(block.attn_norm(x), positions, segment_ids, lengths_B,
                                          layer_cache)
      return block.mlp_residual(x + h), layer_cache

    x, cache = self._over_layers(self.embed(tokens_BT), step, cache)
    return self.logits(x), cache

  def decode(self, token_B, position_B, cache):
    """One token per row at position_B (its index in the row): (logits [B, V], cache)."""
    def step(gd, state, x, layer, layer_cache):
      block = nnx.merge(gd, state)
      block.at_layer(layer)
      h, layer_cache = block.attn.decode(block.attn_norm(x), position_B, layer_cache)
      return block.mlp_residual(x + h), layer_cache

    x, cache = self._over_layers(self.embed(token_B), step, cache)
    return self.logits(x), cache


def _run_block(graphdef, state, x_BTD, layer, *, positions_BT, segment_ids_BT, dropout_rng):
  """One block as a function of its parameters (what jax.checkpoint and lax.scan see)."""
  block = nnx.merge(graphdef, state)
  block.at_layer(layer)
  rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer)
  return block(x_BTD, positions_BT, segment_ids_BT, rng)


def stacking_error(model_cfg) -> str | None:
  """Why scan_layers cannot stack this model's blocks (None when it can): the first two layers
  at each place of the pattern are built abstractly and compared."""
  dims = ModelDims.from_config(model_cfg)
  period, groups, _ = stack_lib.scan_groups(dims.layer_kinds)
  if groups < 2:
    return None

  def build():
    rngs = nnx.Rngs(0)
    return [stack_lib.stack_blocks([Block(dims, model_cfg.attention, p + g * period, rngs=rngs)
                                    for g in (0, 1)], p) for p in range(period)]
  try:
    nnx.eval_shape(build)
  except stack_lib.LayerStructureError as e:
    return str(e)
  return None
