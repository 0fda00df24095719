"""Flash attention as Pallas Mosaic GPU (Hopper) kernels, forward and backward.

One CTA (one warpgroup) per (query block, query head, batch): the query tile is copied to shared
memory by TMA once; key/value tiles stream through a software pipeline (plgpu.emit_pipeline,
two stages in flight); S = Q K^T and O += P V run on the tensor cores (wgmma) with fp32
accumulation; the running max and sum stay in registers (online softmax). Causal attention
stops the pipeline at the diagonal and a sliding window (window=w: |t - s| < w) also starts it
at the window's first block, so masked tiles are neither loaded nor computed. GQA: the
key/value head of query head h is h // (Hq // Hkv), read in place. Segment ids and the padded
tail are masked by position inside each tile.

Backward (FlashAttention-2's, from the saved log-sum-exp): a dq kernel per query block walks the
key blocks up to the diagonal; a dk/dv kernel per (key block, query head) walks the query
blocks from the diagonal on, computing the transposed tiles (keys as rows) so that both
products accumulate on the tensor cores. dk, dv are per query head, summed over each group.

Layout: [B, T, H, D] as the API takes it (TMA reads the strided head slices); T is padded to the
tile.

Status: validated in Mosaic GPU interpret mode on the CPU (tests/test_gpu_kernel.py) and by
lowering for CUDA with jax.export (the same file); not yet run on a GPU. It is impl="pallas" on
GPUs; impl="auto" keeps cuDNN there until the benchmark shows this kernel ahead.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import cdiv, pad_for_tiles, StaticConfig

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
DTYPES = (jnp.bfloat16, jnp.float16)
SCHEDULES = ("ws", "one_warpgroup")


def _smem_transforms(dtype):
  swizzle = 128
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _kv_range(q0, *, bq, bk, nk, causal, window):
  """[first, end) of the key blocks that queries [q0, q0 + bq) can see."""
  if causal:
    end = jnp.minimum(cdiv(q0 + bq, bk), nk)
  elif window is None:
    end = nk
  else:
    end = jnp.minimum(cdiv(q0 + bq - 1 + window, bk), nk)
  first = 0 if window is None else jnp.maximum(q0 - window + 1, 0) // bk
  return first, end


def _q_range(k0, *, bq, bk, nq, causal, window):
  """[first, end) of the query blocks that can see keys [k0, k0 + bk)."""
  if causal:
    first = k0 // bq
  else:
    first = 0 if window is None else jnp.maximum(k0 - window + 1, 0) // bq
  end = nq if window is None else jnp.minimum(cdiv(k0 + bk - 1 + window, bq), nq)
  return first, end


def _visits(table, lists, bi, h, i, formula):
  """(steps, block_at): how many blocks tile i visits and the j-th one. table: None (use
  formula() -> (first, end)), ranges [B, Hq, n, 2] ([first, end)), or when lists, block lists
  [B, Hq, n, 1 + n_max] (column 0 the count, then the blocks)."""
  if table is None:
    first, end = formula()
  elif not lists:
    first, end = table[bi, h, i, 0], table[bi, h, i, 1]
  else:
    return table[bi, h, i, 0], lambda j: table[bi, h, i, 1 + j]
  return end - first, lambda j: first + j


def _query_major_mask(q0, ki, q_seg_rows, k_seg_ref, *, bq, bk, s_len, causal, window):
  """keep [bq, bk] of the tile (query tile at q0, key tile ki) in the forward and dq kernels;
  q_seg_rows [bq] (WGMMA rows) or None (no segment ids: nothing to load), k_seg_ref the key
  segment ids [S] in memory."""
  wg = plgpu.Layout.WGMMA
  q_pos = q0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=wg)
  k_pos = ki * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wg)
  q_seg = k_seg = None
  if q_seg_rows is not None:
    k_seg_cols = plgpu.load(k_seg_ref.at[pl.ds(ki * bk, bk)], layout=wg.reduce(0),
                            optimized=False)
    q_seg = jax.lax.broadcast_in_dim(q_seg_rows, (bq, bk), [0])
    k_seg = jax.lax.broadcast_in_dim(k_seg_cols, (bq, bk), [1])
  return _tile_mask(q_pos, k_pos, q_seg, k_seg, s_len=s_len, causal=causal, window=window)


def _split(rest, ranges):
  """(the ranges ref or None, the remaining kernel refs)."""
  return (rest[0], rest[1:]) if ranges is not None else (None, rest)


def _seg_ref(seg_gmem, bi, h):
  """A query segment-id row: seg [B, T] (shared by the heads) or [B, Hq, T] (per head)."""
  return seg_gmem.at[bi, h] if len(seg_gmem.shape) == 3 else seg_gmem.at[bi]


def _query_seg_rows(segments, seg_gmem, bi, h, q0, rows):
  """The query tile's segment ids [rows] (WGMMA rows), or None without segment ids (the tail
  is masked by position alone, so no ids are loaded)."""
  if not segments:
    return None
  return plgpu.load(_seg_ref(seg_gmem, bi, h).at[pl.ds(q0, rows)],
                    layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)


def _tile_mask(q_pos, k_pos, q_seg, k_seg, *, s_len, causal, window):
  keep = k_pos < s_len
  if q_seg is not None:
    keep = keep & (q_seg == k_seg)
  if causal:
    keep = keep & (k_pos <= q_pos)
  if window is not None:
    keep = keep & (jnp.abs(q_pos - k_pos) < window)
  return keep


def _forward(q, k, v, q_seg, k_seg, ranges=None, *, causal, window, scale, s_len, bq, bk, stages,
             interpret, p_in_smem, segments, lists=False):
  """ranges (optional): a table of each query tile's key blocks instead of the causal / window
  formula: [first, end) ranges [B, Hq, nq, 2], or with lists=True block lists
  [B, Hq, nq, 1 + n_max] (count, then blocks). q_seg is [B, Tp], or per head [B, Hq, Tp]."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  nk = sp // bk
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)

  def kernel(q_gmem, k_gmem, v_gmem, qseg_gmem, kseg_gmem, *rest):
    ranges_gmem, (o_gmem, lse_gmem, q_smem, lse_smem, barrier, *p_smem) = _split(rest, ranges)
    p_smem = p_smem[0] if p_smem else None
    qi, h, bi = (jax.lax.axis_index(n) for n in ("q", "h", "b"))
    kvh = h // group
    q0 = qi * bq
    plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(q0, bq), h], q_smem, barrier)
    plgpu.barrier_wait(barrier)
    q_seg_rows = _query_seg_rows(segments, qseg_gmem, bi, h, q0, bq)
    steps, block_at = _visits(ranges_gmem, lists, bi, h, qi, lambda: _kv_range(
        q0, bq=bq, bk=bk, nk=nk, causal=causal, window=window))

    def body(idx, k_smem, v_smem, carry):
      ki = block_at(idx[0])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.T)
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32)) * (scale * LOG2E)
      keep = _query_major_mask(q0, ki, q_seg_rows, kseg_gmem.at[bi], bq=bq, bk=bk, s_len=s_len,
                               causal=causal, window=window)
      return _online_softmax_step(s, keep, carry, v_smem, p_smem, d=d, dtype=dtype)

    spec = plgpu.BlockSpec((bk, d), lambda j: (block_at(j), 0), transforms=transforms)
    init = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wg),
            plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), wg.reduce(1)),
            plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), wg.reduce(1)))
    acc, m_i, l_i = plgpu.emit_pipeline(
        body, grid=(steps,), in_specs=[spec, spec], max_concurrent_steps=stages,
        init_carry=init)(k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh])

    empty = l_i == 0.0
    safe_l = jnp.where(empty, 1.0, l_i)
    q_smem[...] = (acc / jax.lax.broadcast_in_dim(safe_l, (bq, d), [0])).astype(dtype)
    # lse in natural log; rows with no key get +inf (the backward's exp(s - lse) is then 0).
    lse_smem[...] = jnp.where(empty, jnp.inf, (m_i + jnp.log2(safe_l)) / LOG2E)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_gmem.at[bi, pl.ds(q0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[bi, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, tp, hq, d), dtype),
                jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
      grid=(tp // bq, hq, b), grid_names=("q", "h", "b"),
      scratch_types=(plgpu.SMEM((bq, d), dtype, transforms=transforms),
                     plgpu.SMEM((bq,), jnp.float32),
                     plgpu.Barrier())
      + ((plgpu.SMEM((bq, bk), dtype, transforms=_smem_transforms(dtype)),) if p_in_smem else ()),
      interpret=interpret or False)
  return call(q, k, v, q_seg, k_seg, *(() if ranges is None else (ranges,)))


WS_ROWS = 64  # query rows per compute warpgroup (wgmma's M)
WS_WARPGROUPS = 2  # compute warpgroups per CTA in the warp-specialised forward


def _online_softmax_step(s, keep, carry, v_smem, p_smem, *, d, dtype):
  """One key tile of the online softmax for one warpgroup's rows: s [rows, bk] scores in log2
  units, keep its mask; carry (acc [rows, d], m [rows], l [rows]). P goes to the tensor cores
  from registers, or through p_smem (interpret mode takes wgmma operands from memory only)."""
  acc, m_i, l_i = carry
  rows, bk = s.shape
  s = jnp.where(keep, s, MASK_VALUE)
  m_new = jnp.maximum(m_i, s.max(axis=1))
  alpha = jnp.exp2(m_i - m_new)
  p = jnp.where(keep, jnp.exp2(s - jax.lax.broadcast_in_dim(m_new, (rows, bk), [0])), 0.0)
  l_i = l_i * alpha + p.sum(axis=1)
  if p_smem is None:
    p_lhs = p.astype(dtype)
  else:
    p_smem[...] = p.astype(dtype)
    plgpu.commit_smem()
    p_lhs = p_smem

  def pv(acc_ref):  # a fresh accumulator (interpret mode cannot seed one from registers)
    plgpu.wgmma(acc_ref, p_lhs, v_smem)
    return acc_ref[...]

  acc = (acc * jax.lax.broadcast_in_dim(alpha, (rows, d), [0])
         + pl.run_scoped(pv, plgpu.ACC((rows, d), jnp.float32)))
  return acc, m_new, l_i


def _forward_ws(q, k, v, q_seg, k_seg, *, causal, window, scale, s_len, bk, stages, interpret,
                p_in_smem, segments):
  """FlashAttention-3's forward schedule (warp specialisation), for the causal / full / window
  formula (no tables): a CTA per (128 query rows, query head, batch) runs three warpgroups, two
  compute warpgroups of 64 rows each and a memory warpgroup that streams the K/V tiles by TMA
  into a ring of `stages` buffers (plgpu.emit_pipeline_warp_specialized), so loads never wait on
  compute and one warpgroup's softmax overlaps the other's matmuls. The CTA walks the key
  blocks of its 128 rows; each warpgroup masks its own. Tp must be a multiple of 128."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  rows, cta_rows = WS_ROWS, WS_ROWS * WS_WARPGROUPS
  nk = sp // bk
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)

  def kernel(q_gmem, k_gmem, v_gmem, qseg_gmem, kseg_gmem, o_gmem, lse_gmem, q_smem, lse_smem,
             barrier, *p_smem):
    qi, h, bi = (jax.lax.axis_index(n) for n in ("q", "h", "b"))
    w = jax.lax.axis_index("wg")
    kvh = h // group
    first, end = _kv_range(qi * cta_rows, bq=cta_rows, bk=bk, nk=nk, causal=causal,
                           window=window)
    q0 = qi * cta_rows + w * rows  # this compute warpgroup's first query row
    p_wg = p_smem[0].at[w] if p_smem else None

    def compute(pipeline):
      plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(q0, rows), h], q_smem.at[w], barrier.at[w])
      plgpu.barrier_wait(barrier.at[w])
      q_seg_rows = _query_seg_rows(segments, qseg_gmem, bi, h, q0, rows)
      init = (plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), wg),
              plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), wg.reduce(1)),
              plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), wg.reduce(1)), q_seg_rows)
      acc, m_i, l_i, _ = pipeline(init)
      empty = l_i == 0.0
      safe_l = jnp.where(empty, 1.0, l_i)
      q_smem.at[w][...] = (acc / jax.lax.broadcast_in_dim(safe_l, (rows, d), [0])).astype(dtype)
      lse_smem.at[w][...] = jnp.where(empty, jnp.inf, (m_i + jnp.log2(safe_l)) / LOG2E)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[w], o_gmem.at[bi, pl.ds(q0, rows), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[w], lse_gmem.at[bi, h, pl.ds(q0, rows)])
      plgpu.wait_smem_to_gmem(0)

    def body(idx, k_smem, v_smem, carry):
      *softmax_carry, q_seg_rows = carry
      ki = first + idx[0]

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem.at[w], k_smem.T)
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((rows, bk), jnp.float32)) * (scale * LOG2E)
      keep = _query_major_mask(q0, ki, q_seg_rows, kseg_gmem.at[bi], bq=rows, bk=bk,
                               s_len=s_len, causal=causal, window=window)
      return (*_online_softmax_step(s, keep, softmax_carry, v_smem, p_wg, d=d, dtype=dtype),
              q_seg_rows)

    spec = plgpu.BlockSpec((bk, d), lambda j: (first + j, 0), transforms=transforms)
    plgpu.emit_pipeline_warp_specialized(
        body, grid=(end - first,), memory_registers=40, in_specs=[spec, spec],
        max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=WS_WARPGROUPS,
        compute_context=compute)(k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh])

  scratch = (plgpu.SMEM((WS_WARPGROUPS, rows, d), dtype, transforms=transforms),
             plgpu.SMEM((WS_WARPGROUPS, rows), jnp.float32),
             plgpu.Barrier(num_barriers=WS_WARPGROUPS))
  if p_in_smem:
    scratch += (plgpu.SMEM((WS_WARPGROUPS, rows, bk), dtype, transforms=transforms),)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, tp, hq, d), dtype),
                jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
      grid=(tp // cta_rows, hq, b), grid_names=("q", "h", "b"),
      num_threads=WS_WARPGROUPS + 1, thread_name="wg", scratch_types=scratch,
      interpret=interpret or False)
  return call(q, k, v, q_seg, k_seg)


def _matmul(lhs, rhs_smem, shape, staging, dtype):
  """lhs [M, K] (registers) @ rhs [K, N] (shared memory) on the tensor cores, fp32 [M, N]. With
  a staging buffer the lhs goes through shared memory (interpret mode needs it there)."""
  if staging is not None:
    staging[...] = lhs.astype(dtype)
    plgpu.commit_smem()
    lhs = staging
  else:
    lhs = lhs.astype(dtype)

  def run(acc_ref):
    plgpu.wgmma(acc_ref, lhs, rhs_smem)
    return acc_ref[...]

  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _smem_product(a_smem, b_smem_t, shape):
  """a [M, K] @ b^T for two shared-memory tiles (b given as [N, K]): fp32 [M, N]."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem_t.T)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _dq(q, k, v, do, lse, delta, q_seg, k_seg, ranges=None, *, causal, window, scale, s_len, bq,
        bk, stages, interpret, stage_in_smem, segments, lists=False):
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  nk = sp // bk
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)

  def kernel(q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, qseg_gmem, kseg_gmem, *rest):
    ranges_gmem, (dq_gmem, q_smem, do_smem, barrier, *ds_smem) = _split(rest, ranges)
    ds_smem = ds_smem[0] if ds_smem else None
    qi, h, bi = (jax.lax.axis_index(n) for n in ("q", "h", "b"))
    kvh = h // group
    q0 = qi * bq
    plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(q0, bq), h], q_smem, barrier)
    plgpu.barrier_wait(barrier)
    plgpu.copy_gmem_to_smem(do_gmem.at[bi, pl.ds(q0, bq), h], do_smem, barrier)
    plgpu.barrier_wait(barrier)
    rows = lambda ref: plgpu.load(ref.at[bi, h, pl.ds(q0, bq)], layout=wg.reduce(1),
                                  optimized=False)
    lse_rows, delta_rows = rows(lse_gmem), rows(delta_gmem)
    q_seg_rows = _query_seg_rows(segments, qseg_gmem, bi, h, q0, bq)
    steps, block_at = _visits(ranges_gmem, lists, bi, h, qi, lambda: _kv_range(
        q0, bq=bq, bk=bk, nk=nk, causal=causal, window=window))

    def body(idx, k_smem, v_smem, acc):
      ki = block_at(idx[0])
      s = _smem_product(q_smem, k_smem, (bq, bk)) * scale
      keep = _query_major_mask(q0, ki, q_seg_rows, kseg_gmem.at[bi], bq=bq, bk=bk, s_len=s_len,
                               causal=causal, window=window)
      p = jnp.where(keep, jnp.exp(s - jax.lax.broadcast_in_dim(lse_rows, (bq, bk), [0])), 0.0)
      dp = _smem_product(do_smem, v_smem, (bq, bk))
      ds = p * (dp - jax.lax.broadcast_in_dim(delta_rows, (bq, bk), [0]))
      return acc + _matmul(ds, k_smem, (bq, d), ds_smem, dtype)

    spec = plgpu.BlockSpec((bk, d), lambda j: (block_at(j), 0), transforms=transforms)
    acc = plgpu.emit_pipeline(
        body, grid=(steps,), in_specs=[spec, spec], max_concurrent_steps=stages,
        init_carry=plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wg))(
            k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh])
    q_smem[...] = (acc * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_gmem.at[bi, pl.ds(q0, bq), h])
    plgpu.wait_smem_to_gmem(0)

  scratch = (plgpu.SMEM((bq, d), dtype, transforms=transforms),
             plgpu.SMEM((bq, d), dtype, transforms=transforms), plgpu.Barrier())
  if stage_in_smem:
    scratch += (plgpu.SMEM((bq, bk), dtype, transforms=transforms),)
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
                      grid=(tp // bq, hq, b), grid_names=("q", "h", "b"),
                      scratch_types=scratch, interpret=interpret or False)(
                          q, k, v, do, lse, delta, q_seg, k_seg,
                          *(() if ranges is None else (ranges,)))


def _dkv(q, k, v, do, lse, delta, q_seg, k_seg, ranges=None, *, causal, window, scale, s_len, bq,
         bk, stages, interpret, stage_in_smem, segments, lists=False):
  """dk, dv per query head ([B, S, Hq, D] in the input dtype, written through the k and v
  tiles' shared memory once they are done); the caller sums each group in fp32."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  nq = tp // bq
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)

  def kernel(q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, qseg_gmem, kseg_gmem, *rest):
    ranges_gmem, (dk_gmem, dv_gmem, k_smem, v_smem, barrier, *stage_smem) = _split(rest, ranges)
    stage_smem = stage_smem[0] if stage_smem else None
    ki, h, bi = (jax.lax.axis_index(n) for n in ("k", "h", "b"))
    kvh = h // group
    k0 = ki * bk
    plgpu.copy_gmem_to_smem(k_gmem.at[bi, pl.ds(k0, bk), kvh], k_smem, barrier)
    plgpu.barrier_wait(barrier)
    plgpu.copy_gmem_to_smem(v_gmem.at[bi, pl.ds(k0, bk), kvh], v_smem, barrier)
    plgpu.barrier_wait(barrier)
    k_seg_rows = (plgpu.load(kseg_gmem.at[bi, pl.ds(k0, bk)], layout=wg.reduce(1),
                             optimized=False) if segments else None)
    steps, block_at = _visits(ranges_gmem, lists, bi, h, ki, lambda: _q_range(
        k0, bq=bq, bk=bk, nq=nq, causal=causal, window=window))

    def body(idx, q_smem, do_smem, carry):
      dk, dv = carry
      qi = block_at(idx[0])
      cols = lambda ref: jax.lax.broadcast_in_dim(
          plgpu.load(ref.at[bi, h, pl.ds(qi * bq, bq)], layout=wg.reduce(0), optimized=False),
          (bk, bq), [1])
      s_t = _smem_product(k_smem, q_smem, (bk, bq)) * scale  # [keys, queries]
      k_pos = k0 + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=wg)
      q_pos = qi * bq + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=wg)
      q_seg = k_seg = None
      if segments:
        q_seg_cols = plgpu.load(_seg_ref(qseg_gmem, bi, h).at[pl.ds(qi * bq, bq)],
                                layout=wg.reduce(0), optimized=False)
        q_seg = jax.lax.broadcast_in_dim(q_seg_cols, (bk, bq), [1])
        k_seg = jax.lax.broadcast_in_dim(k_seg_rows, (bk, bq), [0])
      keep = _tile_mask(q_pos, k_pos, q_seg, k_seg, s_len=s_len, causal=causal, window=window)
      p_t = jnp.where(keep, jnp.exp(s_t - cols(lse_gmem)), 0.0)
      dp_t = _smem_product(v_smem, do_smem, (bk, bq))
      ds_t = p_t * (dp_t - cols(delta_gmem))
      dv = dv + _matmul(p_t, do_smem, (bk, d), stage_smem, dtype)
      dk = dk + _matmul(ds_t, q_smem, (bk, d), stage_smem, dtype)
      return dk, dv

    spec = plgpu.BlockSpec((bq, d), lambda j: (block_at(j), 0), transforms=transforms)
    zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), wg)
    dk, dv = plgpu.emit_pipeline(
        body, grid=(steps,), in_specs=[spec, spec], max_concurrent_steps=stages,
        init_carry=(zeros, zeros))(q_gmem.at[bi, :, h], do_gmem.at[bi, :, h])
    k_smem[...] = (dk * scale).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_gmem.at[bi, pl.ds(k0, bk), h])
    plgpu.copy_smem_to_gmem(v_smem, dv_gmem.at[bi, pl.ds(k0, bk), h])
    plgpu.wait_smem_to_gmem(0)

  scratch = (plgpu.SMEM((bk, d), dtype, transforms=transforms),
             plgpu.SMEM((bk, d), dtype, transforms=transforms), plgpu.Barrier())
  if stage_in_smem:
    scratch += (plgpu.SMEM((bk, bq), dtype, transforms=transforms),)
  out = jax.ShapeDtypeStruct((b, sp, hq, d), dtype)
  return plgpu.kernel(kernel, out_type=(out, out), grid=(sp // bk, hq, b),
                      grid_names=("k", "h", "b"), scratch_types=scratch,
                      interpret=interpret or False)(q, k, v, do, lse, delta, q_seg, k_seg,
                                                    *(() if ranges is None else (ranges,)))


class _Config(StaticConfig):
  def __init__(self, **kw):
    self.kw = kw
    self.key = tuple(sorted((k, id(v) if k == "interpret" else v) for k, v in kw.items()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_gpu(q, k, v, segment_ids, tables, cfg):
  """(out [B, T, Hq, D], lse [B, Hq, T]). tables: None, or a dict of int32 arrays that replace
  the causal / window block ranges: kv_ranges [B, Hq, nq, 2] (each query tile's key blocks)
  and q_ranges [B, Hq, nk, 2] (each key tile's query blocks), or block lists kv_lists
  [B, Hq, nq, 1 + n_max] and q_lists (count, then blocks); and optionally q_seg [B, Hq, T] and
  k_seg [B, S] (then T and S must already be multiples of the tiles; MoBA's routed part)."""
  return _flash_gpu_fwd(q, k, v, segment_ids, tables, cfg)[0]


def _tables(tables):
  """(table for the query-major kernels, table for dk/dv, whether they are block lists)."""
  if tables is None:
    return None, None, False
  if "kv_lists" in tables:
    return tables["kv_lists"], tables["q_lists"], True
  return tables["kv_ranges"], tables["q_ranges"], False


def _warp_specialised(tables, kw) -> bool:
  """Whether the forward runs the warp-specialised schedule (formula ranges only)."""
  return tables is None and kw.get("schedule") == "ws"


def _has_segments(tables, kw) -> bool:
  """Whether the kernels compare segment ids (given ones, or a table's per-head ids); without,
  they mask by position alone and load no ids."""
  return kw.get("segments", True) or (tables is not None and "q_seg" in tables)


def _operands(q, k, v, segment_ids, tables, kw):
  if tables is not None and "q_seg" in tables:
    return q, k, v, tables["q_seg"], tables["k_seg"]
  # The warp-specialised forward's CTA takes 128 query rows; the backward's tiles divide them.
  if _warp_specialised(tables, kw):
    return pad_for_tiles(q, k, v, segment_ids, math.lcm(WS_ROWS * WS_WARPGROUPS, kw["bq"]),
                         math.lcm(kw["bk_ws"], kw["bk"]))
  return pad_for_tiles(q, k, v, segment_ids, kw["bq"], kw["bk"])


def _flash_gpu_fwd(q, k, v, segment_ids, tables, cfg):
  kw = cfg.kw
  t = q.shape[1]
  qp, kp, vp, q_seg, k_seg = _operands(q, k, v, segment_ids, tables, kw)
  kv_table, _, lists = _tables(tables)
  common = dict(causal=kw["causal"], window=kw["window"], scale=kw["scale"], s_len=kw["s_len"],
                stages=kw["stages"], interpret=kw["interpret"], p_in_smem=kw["stage_in_smem"],
                segments=_has_segments(tables, kw))
  if _warp_specialised(tables, kw):
    o, lse = _forward_ws(qp, kp, vp, q_seg, k_seg, bk=kw["bk_ws"], **common)
  else:
    o, lse = _forward(qp, kp, vp, q_seg, k_seg, kv_table, bq=kw["bq"], bk=kw["bk"], lists=lists,
                      **common)
  return (o[:, :t], lse[:, :, :t]), (qp, kp, vp, q_seg, k_seg, tables, o, lse, t, k.shape[1])


def _flash_gpu_bwd(cfg, res, cotangents):
  kw = cfg.kw
  qp, kp, vp, q_seg, k_seg, tables, o, lse, t, s = res
  do, dlse = cotangents
  b, tp, hq, d = qp.shape
  hkv = kp.shape[2]
  do_p = jnp.pad(do, ((0, 0), (0, tp - t), (0, 0), (0, 0))).astype(qp.dtype)
  delta = jnp.einsum("bthd,bthd->bht", do_p.astype(jnp.float32), o.astype(jnp.float32))
  delta = delta - jnp.pad(dlse.astype(jnp.float32), ((0, 0), (0, 0), (0, tp - t)))
  common = dict(causal=kw["causal"], window=kw["window"], scale=kw["scale"], s_len=kw["s_len"],
                bq=kw["bq"], bk=kw["bk"], stages=kw["stages"], interpret=kw["interpret"],
                stage_in_smem=kw["stage_in_smem"], segments=_has_segments(tables, kw))
  args = (qp, kp, vp, do_p, lse, delta, q_seg, k_seg)
  kv_table, q_table, lists = _tables(tables)
  dq = _dq(*args, kv_table, lists=lists, **common)
  dk, dv = _dkv(*args, q_table, lists=lists, **common)
  fold = lambda x: x.astype(jnp.float32).reshape(b, -1, hkv, hq // hkv, d).sum(axis=3)[
      :, :s].astype(kp.dtype)
  no_grad = None if tables is None else jax.tree.map(lambda _: None, tables)
  return dq[:, :t], fold(dk), fold(dv), None, no_grad


_flash_gpu.defvjp(_flash_gpu_fwd, _flash_gpu_bwd)


def _check(q, k, v, block_q, block_k):
  if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"the Mosaic GPU attention kernel takes bfloat16/float16 q, k, v; got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  d = q.shape[-1]
  if d % 64 or d > 256:
    raise ValueError(f"the Mosaic GPU attention kernel takes head dims 64, 128, 192 or 256; "
                     f"got {d}")
  if block_q % 64 or block_k % 64:
    raise ValueError(f"block_q={block_q} and block_k={block_k} must be multiples of 64 (wgmma)")


def flash_attention_gpu(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, block_q=64, block_k=64, stages=2, interpret=None,
                        stage_in_smem=None, window=None, schedule="ws"):
  """Softmax attention on the Mosaic GPU kernels, forward and backward (custom_vjp).
  q [B, T, Hq, D], k/v [B, S, Hkv, D] in bf16/fp16 (fp32 inputs run with bf16 tensor-core
  operands and fp32 accumulation, and come back as fp32), D in 64..256 (a multiple of 64).
  schedule: "ws" runs the forward warp-specialised (FlashAttention-3's: two compute warpgroups
  and a TMA producer per CTA of 128 query rows), "one_warpgroup" the plain pipelined forward;
  the backward kernels are the same. block_q, block_k are the tiles of the backward and of the
  "one_warpgroup" forward; the "ws" forward takes 128 query rows per CTA and key tiles of 128
  (64 above head dim 128).
  interpret=plgpu.InterpretGPUParams() runs it on the CPU; stage_in_smem (default: only when
  interpreting) feeds register operands of wgmma through shared memory."""
  if alibi_slopes is not None:
    raise ValueError("the Mosaic GPU attention kernel does not take alibi_slopes yet "
                     "(use impl='reference' or 'xla')")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
  if q.dtype == jnp.float32 and k.dtype == v.dtype == jnp.float32:
    out = flash_attention_gpu(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                              v.astype(jnp.bfloat16), causal=causal, segment_ids=segment_ids,
                              sm_scale=sm_scale, block_q=block_q, block_k=block_k, stages=stages,
                              interpret=interpret, stage_in_smem=stage_in_smem, window=window,
                              schedule=schedule)
    return out.astype(jnp.float32)
  d = q.shape[-1]
  _check(q, k, v, block_q, block_k)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window={window!r} must be a positive int")
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  cfg = _Config(causal=causal, window=window, scale=scale,
                s_len=k.shape[1], bq=block_q, bk=block_k, stages=stages, interpret=interpret,
                stage_in_smem=bool(interpret) if stage_in_smem is None else stage_in_smem,
                schedule=schedule, bk_ws=128 if d <= 128 else 64,
                segments=segment_ids is not None)
  return _flash_gpu(q, k, v, segment_ids, None, cfg)[0]
