"""Sparse attention on the Mosaic GPU flash kernels (pallas_kernels/blockwise/pallas_gpu.py): a
sliding window is the kernel's key-block range [first block of the window, diagonal] plus the
in-tile window mask, so only the band is loaded and computed; a BlockMask becomes static lists
of the key tiles each query tile visits (and the transposed lists for dk/dv), read by the
kernels' pipelines; MoBA is in moba_gpu.py."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import cdiv
from pallas_kernels.blockwise.pallas_gpu import _check, _Config, _flash_gpu, flash_attention_gpu
from pallas_kernels.blockwise.pallas_tpu import dense_block_keep, lists_from_keep
from pallas_kernels.sparse.moba_gpu import TILE, moba_gpu
from pallas_kernels.sparse.patterns import BlockMask, MoBA, SlidingWindow


def sparse_flash_gpu(q, k, v, *, pattern, causal=True, segment_ids=None, sm_scale=None,
                     alibi_slopes=None, interpret=None):
  if isinstance(pattern, MoBA):
    return moba_gpu(q, k, v, pattern=pattern, segment_ids=segment_ids, sm_scale=sm_scale,
                    alibi_slopes=alibi_slopes, interpret=interpret)
  if isinstance(pattern, BlockMask):
    return _block_mask(q, k, v, pattern, causal=causal, segment_ids=segment_ids,
                       sm_scale=sm_scale, alibi_slopes=alibi_slopes, interpret=interpret)
  if not isinstance(pattern, SlidingWindow):
    raise ValueError(f"sparse_attention: pattern={pattern!r} has no Mosaic GPU kernel")
  return flash_attention_gpu(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                             alibi_slopes=alibi_slopes, interpret=interpret,
                             window=pattern.window)


def tile_lists(pattern: BlockMask, t: int, s: int, causal: bool):
  """(query-major lists [nq, 1 + n_max], key-major lists [nk, 1 + m_max]) of the kernel's 64-row
  tiles under the pattern (and causality): column 0 the count, then the tiles."""
  r = pattern.block_size // TILE
  nq, nk = cdiv(t, TILE), cdiv(s, TILE)
  keep = np.repeat(np.repeat(pattern.array, r, axis=0), r, axis=1)[:nq, :nk]
  keep = keep & dense_block_keep(nq, nk, TILE, TILE, causal)
  pack = lambda lists: np.concatenate([lists[1][:, None], lists[0]], axis=1).astype(np.int32)
  return pack(lists_from_keep(keep)), pack(lists_from_keep(keep.T))


def _block_mask(q, k, v, pattern, *, causal, segment_ids, sm_scale, alibi_slopes, interpret):
  if alibi_slopes is not None:
    raise ValueError("the Mosaic GPU block-mask kernels do not take alibi_slopes yet "
                     "(use impl='reference' or 'xla')")
  if pattern.block_size % TILE:
    raise ValueError(f"sparse_attention: the Mosaic GPU kernel needs BlockMask block_size a "
                     f"multiple of {TILE}; got {pattern.block_size}")
  b, t, hq, d = q.shape
  s = k.shape[1]
  want = (cdiv(t, pattern.block_size), cdiv(s, pattern.block_size))
  if pattern.array.shape != want:
    raise ValueError(f"sparse_attention: BlockMask of shape {pattern.array.shape} does not fit "
                     f"T={t}, S={s} with block_size={pattern.block_size} (needs {want})")
  _check(q, k, v, TILE, TILE)
  kv_lists, q_lists = tile_lists(pattern, t, s, causal)
  broadcast = lambda x: jnp.broadcast_to(jnp.asarray(x), (b, hq) + x.shape)
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  cfg = _Config(causal=causal, window=None, scale=scale,
                s_len=s, bq=TILE, bk=TILE, stages=2, interpret=interpret,
                stage_in_smem=bool(interpret), segments=segment_ids is not None)
  tables = {"kv_lists": broadcast(kv_lists), "q_lists": broadcast(q_lists)}
  return _flash_gpu(q, k, v, segment_ids, None, tables, cfg)[0]
