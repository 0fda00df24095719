"""MoBA on TPU with work proportional to the routing: (query token, chosen block) pairs.

Every query attends causally inside its own block and fully to its top_k - 1 routed past blocks
(routing.py). Two kernels compute the two parts and jnp merges them by their log-sum-exps:
  - own block: the block-list flash kernel with a block-diagonal list (blockwise/pallas_tpu.py);
  - routed blocks: the (token, block) pairs of each (batch, head) are sorted by block, and the
    queries gathered into a buffer where each block's queries fill whole tiles of `bq` rows
    (the varlen layout of the MoBA paper's implementation). Work tile w of that buffer attends
    to one key block, whose index is scalar-prefetched: a tile is one q [bq, D] x k [Bm, D]
    product, and no tile is computed for a block nobody chose.
Backward: dq per work tile; dk and dv accumulate over the consecutive tiles of each block
(the grid walks the buffer in block order, so a block's output tile stays resident). The gather
and the merge are jnp, so autodiff routes dq back to the tokens and splits the output
gradient between the parts (the merge's log-sum-exp gradients enter the kernels' delta).

Layout inside: [B, H, N, D] with N the gathered rows; keys [B, Hkv, S, D] read through index
maps (GQA without repeats); dk, dv per query head, summed over each group in jnp.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import cdiv, StaticConfig
from pallas_kernels.blockwise.pallas_tpu import (DEFAULT_BLOCK, MASK_VALUE, _block_size,
                                                 _Config, _dot, _flash, _static_lists,
                                                 dense_block_keep)
from pallas_kernels.sparse.routing import moba_routing

SEMANTICS = ("parallel", "parallel", "arbitrary")


def moba_tile(moba_block: int, t: int, block: int = DEFAULT_BLOCK) -> int:
  """The own-block kernel's tile: the largest multiple of 8 dividing the MoBA block, at most
  `block` (and no longer than T rounded up to 8)."""
  if moba_block % 8:
    raise ValueError(f"sparse_attention: the TPU kernel needs MoBA block_size divisible by 8; "
                     f"got {moba_block}")
  cap = min(block, moba_block, _block_size(t, block))
  return next(c for c in range(cap - cap % 8, 7, -8) if moba_block % c == 0)


# ---- the gathered layout (jnp) ------------------------------------------------------------------

def gather_plan(routes_BTHP, num_blocks: int, bq: int):
  """Where each (token, route) pair goes in the gathered buffer, per (batch, head).

  Returns dest [B, H, T, P] (row in the buffer; n_rows where the route is -1), token
  [B, H, n_rows] (source token per row, -1 for padding), tile_block [B, H, W] (key block of
  work tile w), tile_work [B, H, W] (1 if the tile has rows) and group_tiles [B, H, nb, 2] (the
  work tiles [first, end) of each block's queries). n_rows = W * bq with W the static bound
  floor(T * P / bq) + num_blocks on the tiles any routing can need.
  """
  b, t, h, p = routes_BTHP.shape
  n_tiles = (t * p) // bq + num_blocks
  n_rows = n_tiles * bq
  routes = jnp.moveaxis(routes_BTHP, 2, 1).reshape(b, h, t * p)  # pair i = token i // p
  blk = jnp.where(routes < 0, num_blocks, routes)  # "none" sorts last
  key = blk * t + jnp.arange(t * p, dtype=jnp.int32) // p
  order = jnp.argsort(key, axis=-1, stable=True)
  blk_sorted = jnp.take_along_axis(blk, order, axis=-1)
  tok_sorted = jnp.take_along_axis(key, order, axis=-1) % t
  edges = jnp.arange(num_blocks + 1, dtype=jnp.int32)
  starts = jax.vmap(jax.vmap(lambda x: jnp.searchsorted(x, edges)))(blk_sorted)  # [B, H, nb+1]
  counts = starts[..., 1:] - starts[..., :-1]
  padded = cdiv_array(counts, bq) * bq
  offsets = jnp.cumsum(padded, axis=-1) - padded  # first row of each block's group
  ends = offsets + padded
  safe_blk = jnp.minimum(blk_sorted, num_blocks - 1)
  rank = jnp.arange(t * p) - jnp.take_along_axis(starts, safe_blk, axis=-1)
  dest_sorted = jnp.where(blk_sorted < num_blocks,
                          jnp.take_along_axis(offsets, safe_blk, axis=-1) + rank, n_rows)
  dest = jnp.zeros_like(dest_sorted).at[
      jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], order].set(dest_sorted)
  token = jnp.full((b, h, n_rows + 1), -1, jnp.int32).at[
      jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], dest_sorted].set(
          tok_sorted)[..., :n_rows]
  tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * bq
  tile_block = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, tile_start, side="right")))(ends)
  tile_work = (tile_block < num_blocks).astype(jnp.int32)
  # Tiles past the last group repeat the last block that has rows (no new copy, no zeroing).
  last = jnp.max(jnp.where(counts > 0, jnp.arange(num_blocks), 0), axis=-1, keepdims=True)
  tile_block = jnp.where(tile_work == 1, tile_block, last).astype(jnp.int32)
  group_tiles = (jnp.stack([offsets, ends], axis=-1) // bq).astype(jnp.int32)
  return dest.reshape(b, h, t, p).astype(jnp.int32), token, tile_block, tile_work, group_tiles


def cdiv_array(a, b: int):
  return -(-a // b)


# ---- kernels -------------------------------------------------------------------------------------

def _logits_and_keep(q_ref, k_ref, qseg_ref, kseg_ref, scale):
  s = _dot(q_ref[...], k_ref[...], 1, 1) * scale  # [bq, Bm]
  keep = qseg_ref[...] == kseg_ref[...]  # [bq, 1] == [1, Bm]; padding rows have segment -1
  return s, keep


def _fwd_kernel(blk_ref, work_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *,
                scale):
  b, h, w = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(work_ref[b, h, w] == 0)
  def _empty():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    lse_ref[...] = jnp.full(lse_ref.shape, jnp.inf, jnp.float32)

  @pl.when(work_ref[b, h, w] == 1)
  def _body():
    s, keep = _logits_and_keep(q_ref, k_ref, qseg_ref, kseg_ref, scale)
    s = jnp.where(keep, s, MASK_VALUE)
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.where(keep, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=1, keepdims=True)
    safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (_dot(p.astype(v_ref.dtype), v_ref[...]) / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m + jnp.log(safe))


def _probs_and_dscores(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, scale):
  s, keep = _logits_and_keep(q_ref, k_ref, qseg_ref, kseg_ref, scale)
  p = jnp.where(keep, jnp.exp(s - lse_ref[...]), 0.0)
  dp = _dot(do_ref[...], v_ref[...], 1, 1)
  return p, p * (dp - delta_ref[...])


def _dq_kernel(blk_ref, work_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale):
  b, h, w = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(work_ref[b, h, w] == 0)
  def _empty():
    dq_ref[...] = jnp.zeros(dq_ref.shape, dq_ref.dtype)

  @pl.when(work_ref[b, h, w] == 1)
  def _body():
    _, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                               delta_ref, scale)
    dq_ref[...] = (_dot(ds.astype(k_ref.dtype), k_ref[...]) * scale).astype(dq_ref.dtype)


def _dkv_kernel(blk_ref, work_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, scale):
  b, h, w = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  prev = blk_ref[b, h, jnp.maximum(w - 1, 0)]

  @pl.when((w == 0) | (blk_ref[b, h, w] != prev))
  def _first_tile_of_the_block():
    dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
    dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

  @pl.when(work_ref[b, h, w] == 1)
  def _body():
    p, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                               delta_ref, scale)
    dv_ref[...] += _dot(p.astype(do_ref.dtype), do_ref[...], 0, 0)
    dk_ref[...] += _dot(ds.astype(q_ref.dtype), q_ref[...], 0, 0) * scale


# ---- pallas_call plumbing -----------------------------------------------------------------------

class _RoutedConfig(StaticConfig):
  def __init__(self, *, bq, block, scale, interpret):
    self.bq, self.block, self.scale, self.interpret = bq, block, scale, interpret
    self.key = (bq, block, scale, id(interpret))


def _specs(cfg, d, group):
  bq, bm = cfg.bq, cfg.block
  row = lambda width: pl.BlockSpec((None, None, bq, width), lambda b, h, w, blk, wk: (b, h, w, 0))
  key = pl.BlockSpec((None, None, bm, d), lambda b, h, w, blk, wk: (b, h // group, blk[b, h, w], 0))
  kseg = pl.BlockSpec((None, 1, bm), lambda b, h, w, blk, wk: (b, 0, blk[b, h, w]))
  out_kv = pl.BlockSpec((None, None, bm, d), lambda b, h, w, blk, wk: (b, h, blk[b, h, w], 0))
  return row, key, kseg, out_kv


def _call(kernel, cfg, grid, plan, in_specs, out_specs, out_shape, name, *args):
  spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                      out_specs=out_specs)
  return pl.pallas_call(functools.partial(kernel, scale=cfg.scale), grid_spec=spec,
                        out_shape=out_shape,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
                        interpret=cfg.interpret, name=name)(*plan, *args)


def _routed_forward(qg, k_t, v_t, qseg, kseg, plan, cfg):
  b, h, n, d = qg.shape
  group = h // k_t.shape[1]
  row, key, kseg_spec, _ = _specs(cfg, d, group)
  o, lse = _call(_fwd_kernel, cfg, (b, h, n // cfg.bq), plan,
                 [row(d), key, key, row(1), kseg_spec], [row(d), row(1)],
                 [jax.ShapeDtypeStruct(qg.shape, qg.dtype),
                  jax.ShapeDtypeStruct((b, h, n, 1), jnp.float32)],
                 "lmtrain_moba_routed_fwd", qg, k_t, v_t, qseg, kseg)
  return (o, lse[..., 0]), (o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _routed(qg, k_t, v_t, qseg, kseg, plan, cfg):
  """Attention of gathered queries qg [B, H, N, D] to their tiles' key blocks of k_t, v_t
  [B, Hkv, S, D]: (out [B, H, N, D], lse [B, H, N])."""
  return _routed_forward(qg, k_t, v_t, qseg, kseg, plan, cfg)[0]


def _routed_fwd(qg, k_t, v_t, qseg, kseg, plan, cfg):
  outs, (o, lse) = _routed_forward(qg, k_t, v_t, qseg, kseg, plan, cfg)
  return outs, (qg, k_t, v_t, qseg, kseg, plan, o, lse)


def _routed_bwd(cfg, res, cotangents):
  qg, k_t, v_t, qseg, kseg, plan, o, lse = res
  do, dlse = cotangents
  b, h, n, d = qg.shape
  hkv = k_t.shape[1]
  group = h // hkv
  delta = (jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
           - dlse[..., None])
  row, key, kseg_spec, out_kv = _specs(cfg, d, group)
  in_specs = [row(d), key, key, row(1), kseg_spec, row(d), row(1), row(1)]
  args = (qg, k_t, v_t, qseg, kseg, do.astype(qg.dtype), lse, delta)
  grid = (b, h, n // cfg.bq)
  dq = _call(_dq_kernel, cfg, grid, plan, in_specs, row(d),
             jax.ShapeDtypeStruct(qg.shape, jnp.float32), "lmtrain_moba_routed_dq", *args)
  s = k_t.shape[2]
  dk, dv = _call(_dkv_kernel, cfg, grid, plan, in_specs, [out_kv, out_kv],
                 [jax.ShapeDtypeStruct((b, h, s, d), jnp.float32)] * 2,
                 "lmtrain_moba_routed_dkv", *args)
  # Key blocks no tile visited were never written (their memory is undefined): zero them.
  tile_block, tile_work = plan
  nb = s // cfg.block
  visited = jnp.any((tile_block[..., None] == jnp.arange(nb)) & (tile_work[..., None] == 1),
                    axis=2)  # [B, H, nb]
  visited = jnp.repeat(visited, cfg.block, axis=-1)[..., None]
  fold = lambda x: jnp.where(visited, x, 0.0).reshape(b, hkv, group, s, d).sum(axis=2)
  no_grad = jax.tree.map(lambda _: None, plan)
  return (dq.astype(qg.dtype), fold(dk).astype(k_t.dtype), fold(dv).astype(v_t.dtype), None,
          None, no_grad)


_routed.defvjp(_routed_fwd, _routed_bwd)


# ---- the MoBA kernel --------------------------------------------------------------------------

def _own_block_attention(q, k, v, segment_ids, *, block, tile, scale, interpret):
  """Causal attention inside each query's own block: (out [B, T, Hq, D], lse [B, Hq, T])."""
  t = q.shape[1]
  n = cdiv(t, tile)
  tiles = np.arange(n) * tile // block
  keep = dense_block_keep(n, n, tile, tile, True) & (tiles[:, None] == tiles[None, :])
  cfg = _Config(t=t, s=t, bq=tile, bk=tile, causal=True, window=None, scale=scale,
                interpret=interpret, key=("moba_own", keep.tobytes(), keep.shape))
  return _flash(q, k, v, segment_ids, None, _static_lists(keep), cfg)


def moba_gathered_tpu(q, k, v, *, pattern, segment_ids=None, sm_scale=None, interpret=None,
                      tile=None, bq=None):
  """MoBA(block_size, top_k) as the two kernels above; q [B, T, Hq, D], k/v [B, T, Hkv, D].
  tile: the own-block kernel's tile (divides block_size); bq: rows per work tile."""
  b, t, hq, d = q.shape
  bm = pattern.block_size
  nb = cdiv(t, bm)
  tile = tile or moba_tile(bm, t)
  bq = bq or _block_size(t, DEFAULT_BLOCK)
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  interpret = interpret or False
  o_own, lse_own = _own_block_attention(q, k, v, segment_ids, block=bm, tile=tile, scale=scale,
                                        interpret=interpret)
  routes = moba_routing(q, k, block_size=bm, top_k=pattern.top_k, segment_ids=segment_ids)
  if routes.shape[-1] == 0:  # top_k 1: the own block is everything
    return o_own
  dest, token, tile_block, tile_work, _ = gather_plan(routes, nb, bq)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  q_bhtd = q.transpose(0, 2, 1, 3)
  safe = jnp.maximum(token, 0)
  qg = jnp.take_along_axis(q_bhtd, safe[..., None], axis=2)  # [B, Hq, N, D]
  qseg = jnp.where(token >= 0, jnp.take_along_axis(seg[:, None, :], safe, axis=2), -1)[..., None]
  pad = nb * bm - t
  to_bhtd = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  kseg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-2)[:, None, :]  # rows [B, 1, S]
  cfg = _RoutedConfig(bq=bq, block=bm, scale=scale, interpret=interpret)
  og, lseg = _routed(qg, to_bhtd(k), to_bhtd(v), qseg, kseg, (tile_block, tile_work), cfg)
  return merge_parts(o_own, lse_own, og, lseg, dest, routes)


def merge_parts(o_own, lse_own, og, lseg, dest, routes):
  """Softmax over the union of the own block and the routed blocks, from each part's output and
  log-sum-exp: o_own [B, T, Hq, D], lse_own [B, Hq, T], og [B, Hq, N, D] and lseg [B, Hq, N]
  (the gathered rows), dest [B, Hq, T, P] (each pair's row), routes [B, T, Hq, P] (-1: none).
  Routes of -1 read a dummy row and are weighted out."""
  b, t, hq, d = o_own.shape
  valid = jnp.moveaxis(routes, 2, 1) >= 0  # [B, Hq, T, P]
  rows = jnp.minimum(dest, og.shape[2] - 1).reshape(b, hq, -1)
  o_pairs = jnp.take_along_axis(og, rows[..., None], axis=2).reshape(b, hq, t, -1, d)
  lse_pairs = jnp.take_along_axis(lseg, rows, axis=2).reshape(b, hq, t, -1)
  lse_pairs = jnp.where(valid, lse_pairs, -jnp.inf)
  lse_all = jnp.concatenate([lse_own[..., None], lse_pairs], axis=-1)  # [B, Hq, T, P+1]
  weights = jax.nn.softmax(lse_all, axis=-1)
  o_all = jnp.concatenate([o_own.transpose(0, 2, 1, 3)[..., None, :].astype(jnp.float32),
                           o_pairs.astype(jnp.float32)], axis=-2)  # [B, Hq, T, P+1, D]
  out = jnp.sum(weights[..., None] * o_all, axis=-2)
  return out.transpose(0, 2, 1, 3).astype(o_own.dtype)


def moba_work_tiles(q, k, pattern, *, segment_ids=None, bq=DEFAULT_BLOCK):
  """(work tiles the routed kernel computes, tiles its static grid holds), summed over batch and
  heads: a work tile is bq gathered queries x one routed key block; the rest do nothing."""
  routes = moba_routing(q, k, block_size=pattern.block_size, top_k=pattern.top_k,
                        segment_ids=segment_ids)
  if routes.shape[-1] == 0:
    return 0, 0
  _, _, _, work, _ = gather_plan(routes, cdiv(q.shape[1], pattern.block_size), bq)
  return int(jax.device_get(jnp.sum(work))), int(work.size)
