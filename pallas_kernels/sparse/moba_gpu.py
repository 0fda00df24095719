"""MoBA on the Mosaic GPU flash kernels (blockwise/pallas_gpu.py), with work proportional to the
routing, as on TPU (moba_tpu.py, whose gather plan and merge this shares):
  - own block: the flash kernels with per-tile block ranges: query tile i visits the key tiles
    from the start of its MoBA block to the diagonal (causal inside);
  - routed blocks: the (token, block) pairs gathered so that each block's queries fill whole
    tiles; work tile w visits the key tiles of its block, and in the backward key tile j visits
    the work tiles of its block (a tile of padding rows when nobody chose it).
The two parts merge by log-sum-exp in jnp. Tiles are 64 (wgmma), so the MoBA block size must be
a multiple of 64.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import cdiv
from pallas_kernels.blockwise.pallas_gpu import _check, _Config, _flash_gpu
from pallas_kernels.sparse.moba_tpu import gather_plan, merge_parts
from pallas_kernels.sparse.routing import moba_routing

TILE = 64


def _own_block_ranges(n_tiles: int, per_block: int):
  """kv_ranges [nq, 2] and q_ranges [nk, 2] of causal attention inside each MoBA block."""
  i = np.arange(n_tiles)
  block_start = (i // per_block) * per_block
  kv = np.stack([block_start, i + 1], axis=-1)
  q = np.stack([i, np.minimum(block_start + per_block, n_tiles)], axis=-1)
  return kv.astype(np.int32), q.astype(np.int32)


def moba_gpu(q, k, v, *, pattern, segment_ids=None, sm_scale=None, alibi_slopes=None,
             interpret=None, stage_in_smem=None):
  """MoBA(block_size, top_k) on the Mosaic GPU kernels; q [B, T, Hq, D], k/v [B, T, Hkv, D]."""
  if alibi_slopes is not None:
    raise ValueError("the Mosaic GPU MoBA kernels do not take alibi_slopes yet "
                     "(use impl='reference' or 'xla')")
  bm = pattern.block_size
  if bm % TILE:
    raise ValueError(f"sparse_attention: the Mosaic GPU MoBA kernel needs block_size a multiple "
                     f"of {TILE}; got {bm}")
  _check(q, k, v, TILE, TILE)
  b, t, hq, d = q.shape
  nb = cdiv(t, bm)
  per_block = bm // TILE
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  stage = bool(interpret) if stage_in_smem is None else stage_in_smem
  config = lambda causal: _Config(causal=causal, window=None, scale=scale, s_len=t, bq=TILE,
                                  bk=TILE, stages=2, interpret=interpret, stage_in_smem=stage,
                                  segments=segment_ids is not None)

  n_tiles = cdiv(t, TILE)
  kv_own, q_own = _own_block_ranges(n_tiles, per_block)
  broadcast = lambda x: jnp.broadcast_to(jnp.asarray(x), (b, hq) + x.shape)
  own = {"kv_ranges": broadcast(kv_own), "q_ranges": broadcast(q_own)}
  o_own, lse_own = _flash_gpu(q, k, v, segment_ids, None, own, config(True))
  routes = moba_routing(q, k, block_size=bm, top_k=pattern.top_k, segment_ids=segment_ids)
  if routes.shape[-1] == 0:  # top_k 1: the own block is everything
    return o_own

  dest, token, tile_block, tile_work, group_tiles = gather_plan(routes, nb, TILE)
  n_work = tile_block.shape[-1]
  # One more tile of padding rows: what key tiles of blocks nobody chose visit.
  token = jnp.pad(token, ((0, 0), (0, 0), (0, TILE)), constant_values=-1)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  safe = jnp.maximum(token, 0)
  qg = jnp.take_along_axis(q.transpose(0, 2, 1, 3), safe[..., None], axis=2)  # [B, Hq, N, D]
  q_seg = jnp.where(token >= 0, jnp.take_along_axis(seg[:, None, :], safe, axis=2), -1)
  sp = nb * bm
  pad = lambda x: jnp.pad(x, ((0, 0), (0, sp - t), (0, 0), (0, 0)))
  k_seg = jnp.pad(seg, ((0, 0), (0, sp - t)), constant_values=-2)
  first = tile_block * per_block
  kv_routed = jnp.where(tile_work[..., None] == 1,
                        jnp.stack([first, first + per_block], axis=-1), jnp.asarray([0, 1]))
  kv_routed = jnp.pad(kv_routed, ((0, 0), (0, 0), (0, 1), (0, 0)))
  kv_routed = kv_routed.at[:, :, -1].set(jnp.asarray([0, 1], jnp.int32))
  chosen = group_tiles[..., 1] > group_tiles[..., 0]  # [B, Hq, nb]
  q_routed = jnp.where(chosen[..., None], group_tiles, jnp.asarray([n_work, n_work + 1]))
  q_routed = jnp.repeat(q_routed, per_block, axis=2)  # per key tile
  routed = {"kv_ranges": kv_routed.astype(jnp.int32), "q_ranges": q_routed.astype(jnp.int32),
            "q_seg": q_seg.astype(jnp.int32), "k_seg": k_seg}
  og, lseg = _flash_gpu(qg.transpose(0, 2, 1, 3), pad(k), pad(v), None, None, routed,
                        config(False))
  return merge_parts(o_own, lse_own, og.transpose(0, 2, 1, 3), lseg, dest, routes)
