"""Flash attention as Pallas Mosaic GPU (Hopper) kernels, forward and backward.

Every kernel is a CTA per (tile of rows, head, batch) whose rows stay in shared memory while the
other side's tiles stream past through a pipeline. Two schedules (flash_attention_gpu's
`schedule`):
- "ws" (default): warp specialisation, as FlashAttention-3: two compute warpgroups of 64 rows
  each and a producer warpgroup that only issues the TMA copies into a ring of shared-memory
  buffers (plgpu.emit_pipeline_warp_specialized), so loads never wait on compute; each streamed
  tile serves 128 rows. In the forward the two warpgroups also ping-pong (they meet at a
  barrier around each product, one a turn behind the other) so that one's softmax runs while
  the other's matmuls hold the tensor cores.
- "one_warpgroup": one warpgroup per CTA and a software pipeline (plgpu.emit_pipeline). The
  tables of MoBA and block masks (per 64-row tile) always run this one.

Forward: S = Q K^T and O += P V on the tensor cores (wgmma) with fp32 accumulation, the online
softmax in registers (log2 domain). Causal attention stops the pipeline at the diagonal and a
sliding window (window=w: |t - s| < w) also starts it at the window's first block, so masked
tiles are neither loaded nor computed. GQA: the key/value head of query head h is
h // (Hq // Hkv), read in place. Segment ids (when given) and the padded tail are masked by
position inside each tile; without segment ids only the tiles that need a mask (the diagonal,
the window's edges, the padded tail) build one, the others (most) skip it (_tile_is_whole).

Backward (FlashAttention-2's, from the saved log-sum-exp): a dq kernel per query tile walks the
key tiles up to the diagonal; a dk/dv kernel per (key tile, head) walks the query tiles
from the diagonal on, computing the transposed tiles (keys as rows) so that both products
accumulate on the tensor cores; for GQA one CTA walks every query head of its key/value head,
so dk, dv are summed over the group in registers (with the per-head tables of MoBA and block
masks they are per query head and summed after). backward="fused" (FlashAttention-3's) drops the
dq kernel: the dk/dv kernel also adds each tile's dq share into fp32 memory by TMA reduce-add,
5 matmuls per tile instead of 7 (the default stays "split" until a GPU has timed both).

Forget gates (FoX's log_gates; ALiBi as constant gates), every schedule and backward: the
running sums c [B, Hq, T] join the scores as c_q - c_k (the query tile's sums loaded once as
rows, each key tile's as columns); the gates' gradient is the row sums of dS for the queries
(summed by the dq kernel, so gated runs take the split backward) and minus the column sums for
the keys (summed per query head by the dk/dv kernel).

Layout: [B, T, H, D] as the API takes it (TMA reads the strided head slices); T is padded to the
tile.

Status: validated in Mosaic GPU interpret mode on the CPU (tests/test_gpu_kernel.py), by
lowering for CUDA with jax.export (the same file), and on an H200 (tests/test_gpu.py;
docs/benchmarks.md: forward 0.84x and forward+backward 0.61x cuDNN at 32k). It is
impl="pallas" on GPUs; impl="auto" keeps cuDNN there until this kernel is ahead.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import cdiv, pad_for_tiles, StaticConfig
from pallas_kernels.blockwise.pallas_tpu import kernel_gates

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
DTYPES = (jnp.bfloat16, jnp.float16)
SCHEDULES = ("ws", "one_warpgroup")
BACKWARDS = ("split", "fused")


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


def _split_gates(rest, gated):
  """(the gate sums' refs (c_q [B, Hq, Tp], c_k [B, Hq, Sp]) or None, the remaining refs)."""
  return (tuple(rest[:2]), rest[2:]) if gated else (None, rest)


def _gate_rows(gate_gmem, bi, h, q0, rows):
  """The query tile's gate sums c_q [rows] (WGMMA rows), or None ungated."""
  if gate_gmem is None:
    return None
  return plgpu.load(gate_gmem[0].at[bi, h, pl.ds(q0, rows)],
                    layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)


def _query_major_bias(c_rows, gate_gmem, bi, h, k0, rows, cols):
  """The gate bias c_q - c_k [rows, cols] of a tile with the queries as rows: c_rows [rows] the
  query tile's sums (_gate_rows), the key tile's sums loaded as columns (per query head)."""
  c_cols = plgpu.load(gate_gmem[1].at[bi, h, pl.ds(k0, cols)],
                      layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
  return (jax.lax.broadcast_in_dim(c_rows, (rows, cols), [0])
          - jax.lax.broadcast_in_dim(c_cols, (rows, cols), [1]))


def _tile_is_whole(q0, k0, *, rows, cols, s_len, padded_len, causal, window, segments):
  """Whether position alone keeps every pair of the tile queries [q0, q0 + rows) x keys
  [k0, k0 + cols): True (statically: no tile is ever masked), None (segment ids: every tile is
  masked, the ids vary), or a traced bool (off-diagonal, inside the window, before the padded
  tail). Most tiles are whole; they skip building and applying the mask, as FlashAttention-3's
  and jax's kernels do."""
  if segments:
    return None
  whole = []
  if padded_len != s_len:
    whole.append(k0 + cols <= s_len)
  if causal:
    whole.append(k0 + cols - 1 <= q0)
  if window is not None:
    whole.append(q0 + rows - 1 - k0 < window)
    if not causal:
      whole.append(k0 + cols - 1 - q0 < window)
  return functools.reduce(jnp.logical_and, whole) if whole else True


def _unless_whole(whole, compute, keep_fn):
  """compute(keep) with the tile's mask keep = keep_fn(), or compute(None) where the tile is
  whole (see _tile_is_whole): the mask is built only on the tiles that need it."""
  if whole is None:
    return compute(keep_fn())
  if whole is True:
    return compute(None)
  return jax.lax.cond(whole, lambda: compute(None), lambda: compute(keep_fn()))


def _tile_mask(q_pos, k_pos, q_seg, k_seg, *, s_len, causal, window):
  keep = k_pos < s_len
  if q_seg is not None:
    keep = keep & (q_seg == k_seg)
  if causal:
    keep = keep & (k_pos <= q_pos)
  if window is not None:
    keep = keep & (jnp.abs(q_pos - k_pos) < window)
  return keep


WS_WARPGROUPS = 2  # compute warpgroups per CTA under warp specialisation


def _warpgroup_pipeline(body, setup, finish, *, ws, steps, specs, stages, gmem_refs):
  """Streams `steps` tiles of gmem_refs (by specs) through shared memory into body, for one
  warpgroup (ws=False: plgpu.emit_pipeline, the kernel's only warpgroup, w = 0) or for
  WS_WARPGROUPS compute warpgroups fed by a producer warpgroup that only issues the TMA copies
  (ws=True: FlashAttention-3's warp specialisation; w = the compute warpgroup). Each compute
  warpgroup runs setup(w) -> (carry, context) (its own loads), then body(w, context, step,
  *tiles, carry) -> carry per tile, then finish(w, carry)."""
  if not ws:
    carry, context = setup(0)

    def plain_body(idx, *refs):
      *tiles, carry = refs
      return body(0, context, idx[0], *tiles, carry)

    finish(0, plgpu.emit_pipeline(plain_body, grid=(steps,), in_specs=specs,
                                  max_concurrent_steps=stages, init_carry=carry)(*gmem_refs))
    return
  w = jax.lax.axis_index("wg")

  def compute(pipeline):
    carry, context = setup(w)
    finish(w, pipeline((carry, context))[0])

  def ws_body(idx, *refs):  # the context rides in the carry: setup ran inside compute()
    *tiles, (carry, context) = refs
    return body(w, context, idx[0], *tiles, carry), context

  plgpu.emit_pipeline_warp_specialized(
      ws_body, grid=(steps,), memory_registers=40, in_specs=specs, max_concurrent_steps=stages,
      wg_axis="wg", num_compute_wgs=WS_WARPGROUPS, compute_context=compute)(*gmem_refs)


def _launch(kernel, *, out_type, grid, grid_names, scratch, ws, interpret):
  threads = dict(num_threads=WS_WARPGROUPS + 1, thread_name="wg") if ws else {}
  return plgpu.kernel(kernel, out_type=out_type, grid=grid, grid_names=grid_names,
                      scratch_types=scratch, interpret=interpret or False, **threads)


def _copy_in(src, dst, barrier):
  plgpu.copy_gmem_to_smem(src, dst, barrier)
  plgpu.barrier_wait(barrier)


def _masked(keep, p):
  """p where keep, else 0 (keep None: the tile is whole, p as is)."""
  return p if keep is None else jnp.where(keep, p, 0.0)


def _online_softmax_step(s, whole, keep_fn, carry, v_smem, p_smem, *, d, dtype,
                         schedule=None):
  """One key tile of the online softmax for one warpgroup's rows: s [rows, bk] scores in log2
  units, masked by keep_fn() unless whole (see _unless_whole); carry (acc [rows, d], m [rows],
  l [rows]). P goes to the tensor cores from registers, or through p_smem (interpret mode takes
  wgmma operands from memory only). schedule (ping-pong, see _forward): called between the
  softmax and the P V product."""
  acc, m_i, l_i = carry
  rows, bk = s.shape

  def probabilities(keep):
    s_kept = s if keep is None else jnp.where(keep, s, MASK_VALUE)
    m_new = jnp.maximum(m_i, s_kept.max(axis=1))
    p = jnp.exp2(s_kept - jax.lax.broadcast_in_dim(m_new, (rows, bk), [0]))
    return _masked(keep, p), m_new

  p, m_new = _unless_whole(whole, probabilities, keep_fn)
  alpha = jnp.exp2(m_i - m_new)
  l_i = l_i * alpha + p.sum(axis=1)
  if schedule is not None:
    schedule()
  # A fresh accumulator for P V (interpret mode cannot seed one from registers).
  pv = _matmul(p, v_smem, (rows, d), p_smem, dtype)
  return acc * jax.lax.broadcast_in_dim(alpha, (rows, d), [0]) + pv, m_new, l_i


def _forward(q, k, v, q_seg, k_seg, ranges=None, gates=(), *, causal, window, scale, s_len, bq,
             bk, stages, interpret, stage_in_smem, segments, lists=False, ws=False):
  """(o [B, Tp, Hq, D], lse [B, Hq, Tp]). A CTA per (query rows, query head, batch): bq rows, or
  with ws WS_WARPGROUPS x bq rows, one compute warpgroup per bq. ranges (optional, not with
  ws): a table of each query tile's key blocks instead of the causal / window formula:
  [first, end) ranges [B, Hq, nq, 2], or with lists=True block lists [B, Hq, nq, 1 + n_max]
  (count, then blocks). q_seg is [B, Tp], or per head [B, Hq, Tp]. gates: () or the gate sums
  (c_q [B, Hq, Tp], c_k [B, Hq, Sp]) fp32, whose bias c_q - c_k joins the scores."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  nk = sp // bk
  n_wg = WS_WARPGROUPS if ws else 1
  cta_rows = n_wg * bq
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)
  whole = lambda q0, k0: _tile_is_whole(q0, k0, rows=bq, cols=bk, s_len=s_len, padded_len=sp,
                                        causal=causal, window=window, segments=segments)

  def kernel(q_gmem, k_gmem, v_gmem, qseg_gmem, kseg_gmem, *rest):
    ranges_gmem, rest = _split(rest, ranges)
    gate_gmem, (o_gmem, lse_gmem, q_smem, lse_smem, barrier, *rest) = _split_gates(rest,
                                                                                   bool(gates))
    schedule, p_smem = (rest[0], rest[1:]) if ws else (None, rest)

    def take_turn():
      """Ping-pong (FlashAttention-3's, and jax's Mosaic GPU kernel's): the two compute
      warpgroups meet at this barrier twice per key tile, once after issuing Q K^T and once
      before P V, and warpgroup 1 starts one meeting late, so one's softmax runs while the
      other's products occupy the tensor cores."""
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)
    qi, h, bi = (jax.lax.axis_index(n) for n in ("q", "h", "b"))
    kvh = h // group
    steps, block_at = _visits(ranges_gmem, lists, bi, h, qi, lambda: _kv_range(
        qi * cta_rows, bq=cta_rows, bk=bk, nk=nk, causal=causal, window=window))
    first_row = lambda w: qi * cta_rows + w * bq

    def setup(w):
      _copy_in(q_gmem.at[bi, pl.ds(first_row(w), bq), h], q_smem.at[w], barrier.at[w])
      init = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wg),
              plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), wg.reduce(1)),
              plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), wg.reduce(1)))
      if ws:  # warpgroup 1 starts one meeting late (take_turn)
        pl.when(w == 1)(take_turn)
      return init, (_query_seg_rows(segments, qseg_gmem, bi, h, first_row(w), bq),
                    _gate_rows(gate_gmem, bi, h, first_row(w), bq))

    def body(w, context, step, k_smem, v_smem, carry):
      q_seg_rows, c_rows = context
      ki = block_at(step)
      turn = take_turn if ws else None
      s = _smem_product(q_smem.at[w], k_smem, (bq, bk), after_issue=turn) * (scale * LOG2E)
      if gate_gmem is not None:  # the scores are in log2 units
        s = s + _query_major_bias(c_rows, gate_gmem, bi, h, ki * bk, bq, bk) * LOG2E
      keep_fn = lambda: _query_major_mask(first_row(w), ki, q_seg_rows, kseg_gmem.at[bi], bq=bq,
                                          bk=bk, s_len=s_len, causal=causal, window=window)
      return _online_softmax_step(s, whole(first_row(w), ki * bk), keep_fn, carry, v_smem,
                                  p_smem[0].at[w] if p_smem else None, d=d, dtype=dtype,
                                  schedule=turn)

    def finish(w, carry):
      if ws:  # ... and warpgroup 0 makes up the meeting at the end
        pl.when(w == 0)(take_turn)
      acc, m_i, l_i = carry
      empty = l_i == 0.0
      safe_l = jnp.where(empty, 1.0, l_i)
      q_smem.at[w][...] = (acc / jax.lax.broadcast_in_dim(safe_l, (bq, d), [0])).astype(dtype)
      # lse in natural log; rows with no key get +inf (the backward's exp(s - lse) is then 0).
      lse_smem.at[w][...] = jnp.where(empty, jnp.inf, (m_i + jnp.log2(safe_l)) / LOG2E)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[w], o_gmem.at[bi, pl.ds(first_row(w), bq), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[w], lse_gmem.at[bi, h, pl.ds(first_row(w), bq)])
      plgpu.wait_smem_to_gmem(0)

    spec = plgpu.BlockSpec((bk, d), lambda j: (block_at(j), 0), transforms=transforms)
    _warpgroup_pipeline(body, setup, finish, ws=ws, steps=steps, specs=[spec, spec],
                        stages=stages, gmem_refs=(k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh]))

  scratch = (plgpu.SMEM((n_wg, bq, d), dtype, transforms=transforms),
             plgpu.SMEM((n_wg, bq), jnp.float32), plgpu.Barrier(num_barriers=n_wg))
  if ws:
    scratch += (plgpu.Barrier(num_arrivals=WS_WARPGROUPS),)
  if stage_in_smem:
    scratch += (plgpu.SMEM((n_wg, bq, bk), dtype, transforms=transforms),)
  call = _launch(kernel, out_type=(jax.ShapeDtypeStruct((b, tp, hq, d), dtype),
                                   jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
                 grid=(tp // cta_rows, hq, b), grid_names=("q", "h", "b"), scratch=scratch,
                 ws=ws, interpret=interpret)
  return call(q, k, v, q_seg, k_seg, *(() if ranges is None else (ranges,)), *gates)


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


def _smem_operand_product(a_smem, b_smem, shape, after_issue=None):
  """a [M, K] @ b [K, N], both shared-memory operands (either may be a .T view): fp32 [M, N].
  after_issue runs while the product is in flight (the ping-pong schedule of _forward)."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _smem_product(a_smem, b_smem_t, shape, after_issue=None):
  """a [M, K] @ b^T for two shared-memory tiles (b given as [N, K]): fp32 [M, N]."""
  return _smem_operand_product(a_smem, b_smem_t.T, shape, after_issue)


def _dq(q, k, v, do, lse, delta, q_seg, k_seg, ranges=None, gates=(), *, causal, window, scale,
        s_len, bq, bk, stages, interpret, stage_in_smem, segments, lists=False, ws=False):
  """dq [B, Tp, Hq, D]: a CTA per (query rows, query head, batch) walks the key tiles those rows
  see (bq rows, or WS_WARPGROUPS x bq with ws, one compute warpgroup per bq). gates: as in
  _forward; then also the queries' gate gradient dc_q [B, Hq, Tp] fp32, the row sums of dS,
  stored from registers."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  nk = sp // bk
  n_wg = WS_WARPGROUPS if ws else 1
  cta_rows = n_wg * bq
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)
  whole = lambda q0, k0: _tile_is_whole(q0, k0, rows=bq, cols=bk, s_len=s_len, padded_len=sp,
                                        causal=causal, window=window, segments=segments)

  def kernel(q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, qseg_gmem, kseg_gmem, *rest):
    ranges_gmem, rest = _split(rest, ranges)
    gate_gmem, rest = _split_gates(rest, gated)
    dq_gmem, *rest = rest
    dcq_gmem, rest = (rest[0], rest[1:]) if gated else (None, rest)
    q_smem, do_smem, barrier, *ds_smem = rest
    qi, h, bi = (jax.lax.axis_index(n) for n in ("q", "h", "b"))
    kvh = h // group
    steps, block_at = _visits(ranges_gmem, lists, bi, h, qi, lambda: _kv_range(
        qi * cta_rows, bq=cta_rows, bk=bk, nk=nk, causal=causal, window=window))
    first_row = lambda w: qi * cta_rows + w * bq

    def setup(w):
      q0 = first_row(w)
      _copy_in(q_gmem.at[bi, pl.ds(q0, bq), h], q_smem.at[w], barrier.at[w])
      _copy_in(do_gmem.at[bi, pl.ds(q0, bq), h], do_smem.at[w], barrier.at[w])
      rows = lambda ref: plgpu.load(ref.at[bi, h, pl.ds(q0, bq)], layout=wg.reduce(1),
                                    optimized=False)
      acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wg)
      if gated:
        acc = (acc, plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), wg.reduce(1)))
      return (acc,
              (rows(lse_gmem), rows(delta_gmem),
               _query_seg_rows(segments, qseg_gmem, bi, h, q0, bq),
               _gate_rows(gate_gmem, bi, h, q0, bq)))

    def body(w, context, step, k_smem, v_smem, carry):
      acc, dcq = carry if gated else (carry, None)
      lse_rows, delta_rows, q_seg_rows, c_rows = context
      ki = block_at(step)
      s = _smem_product(q_smem.at[w], k_smem, (bq, bk)) * scale
      if gate_gmem is not None:
        s = s + _query_major_bias(c_rows, gate_gmem, bi, h, ki * bk, bq, bk)
      keep_fn = lambda: _query_major_mask(first_row(w), ki, q_seg_rows, kseg_gmem.at[bi], bq=bq,
                                          bk=bk, s_len=s_len, causal=causal, window=window)
      p = _unless_whole(whole(first_row(w), ki * bk), lambda keep: _masked(
          keep, jnp.exp(s - jax.lax.broadcast_in_dim(lse_rows, (bq, bk), [0]))), keep_fn)
      dp = _smem_product(do_smem.at[w], v_smem, (bq, bk))
      ds = p * (dp - jax.lax.broadcast_in_dim(delta_rows, (bq, bk), [0]))
      acc = acc + _matmul(ds, k_smem, (bq, d), ds_smem[0].at[w] if ds_smem else None, dtype)
      return (acc, dcq + ds.sum(axis=1)) if gated else acc

    def finish(w, carry):
      acc, dcq = carry if gated else (carry, None)
      if gated:  # straight from registers (a [bq] vector): no staging buffer
        dcq_gmem.at[bi, h, pl.ds(first_row(w), bq)][...] = dcq
      q_smem.at[w][...] = (acc * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[w], dq_gmem.at[bi, pl.ds(first_row(w), bq), h])
      plgpu.wait_smem_to_gmem(0)

    spec = plgpu.BlockSpec((bk, d), lambda j: (block_at(j), 0), transforms=transforms)
    _warpgroup_pipeline(body, setup, finish, ws=ws, steps=steps, specs=[spec, spec],
                        stages=stages, gmem_refs=(k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh]))

  gated = bool(gates)
  tile = plgpu.SMEM((n_wg, bq, d), dtype, transforms=transforms)
  scratch = (tile, tile, plgpu.Barrier(num_barriers=n_wg))
  if stage_in_smem:
    scratch += (plgpu.SMEM((n_wg, bq, bk), dtype, transforms=transforms),)
  out_type = jax.ShapeDtypeStruct(q.shape, dtype)
  if gated:
    out_type = (out_type, jax.ShapeDtypeStruct((b, hq, tp), jnp.float32))
  return _launch(kernel, out_type=out_type,
                 grid=(tp // cta_rows, hq, b), grid_names=("q", "h", "b"), scratch=scratch,
                 ws=ws, interpret=interpret)(q, k, v, do, lse, delta, q_seg, k_seg,
                                             *(() if ranges is None else (ranges,)), *gates)


def _dkv(q, k, v, do, lse, delta, q_seg, k_seg, ranges=None, gates=(), *, causal, window, scale,
         s_len, bq, bk, stages, interpret, stage_in_smem, segments, lists=False, ws=False,
         fused_dq=False):
  """(dk, dv) in the input dtype, written through the k and v tiles' shared memory once done;
  with gates (as in _forward) also the keys' gate gradient dc_k [B, Hq, Sp] fp32, minus the
  column sums of dS per query head (see below); with fused_dq also dq [B, Tp, Hq, D] fp32.
  A CTA per (keys, head, batch) walks the query tiles that see those keys (bk keys, or
  WS_WARPGROUPS x bk with ws, one compute warpgroup per bk), on transposed tiles (keys as rows)
  so that both products accumulate on the tensor cores. Without tables the query tiles are the
  same for every query head of a group, so the CTA is per key/value head and walks them for
  each of its query heads in one pipeline: dk, dv [B, S, Hkv, D], summed over the group in
  registers. With tables (per query head) they are per query head, [B, S, Hq, D], and the
  caller sums each group.

  fused_dq (FlashAttention-3's backward; not with tables): the CTA also computes each visited
  tile's dq share dS^T K (dS staged in shared memory as the transposed operand) and adds it
  into an fp32 dq in memory by a TMA reduce-add, so no separate dq kernel recomputes Q K^T and
  dO V^T (5 matmuls per tile instead of 7). Returned unscaled (times `scale` by the caller).
  Interpret mode has no TMA reduction: there each compute warpgroup adds into its own copy of
  dq by load + store (interpreted CTAs run one at a time, so that is race-free) and the copies
  are summed.

  dc_k: the pipeline walks one query head's tiles after another, so a register vector [bk]
  sums -dS over the current head's tiles (the rows of the transposed tile) and goes to memory
  through shared memory when the head's last tile is done, then restarts at zero."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  heads_per_cta = group if ranges is None else 1
  dtype = q.dtype
  nq = tp // bq
  n_wg = WS_WARPGROUPS if ws else 1
  cta_keys = n_wg * bk
  wg = plgpu.Layout.WGMMA
  transforms = _smem_transforms(dtype)
  whole = lambda q0, k0: _tile_is_whole(q0, k0, rows=bq, cols=bk, s_len=s_len, padded_len=sp,
                                        causal=causal, window=window, segments=segments)

  dq_copies = n_wg if interpret else 1  # dq buffers (see fused_dq above)

  def kernel(q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, qseg_gmem, kseg_gmem, *rest):
    ranges_gmem, rest = _split(rest, ranges)
    gate_gmem, rest = _split_gates(rest, gated)
    dq_acc = None
    if fused_dq:
      dq_acc, *rest = rest
    dk_gmem, dv_gmem, *rest = rest
    dck_gmem, rest = (rest[0], rest[1:]) if gated else (None, rest)
    k_smem, v_smem, barrier, *rest = rest
    if gated:
      *rest, dck_smem = rest
    ds_smem, dq_smem = rest[:2] if fused_dq else (None, None)
    stage_smem = rest[2:] if fused_dq else rest
    ki, hh, bi = (jax.lax.axis_index(n) for n in ("k", "h", "b"))  # hh: the output's head
    kvh = hh if ranges is None else hh // group
    first_head = kvh * group if ranges is None else hh
    per_head, block_at = _visits(ranges_gmem, lists, bi, first_head, ki, lambda: _q_range(
        ki * cta_keys, bq=bq, bk=cta_keys, nq=nq, causal=causal, window=window))
    # Pipeline step j: query head first_head + j // per_head, its (j % per_head)-th tile.
    head_at = lambda j: first_head + j // jnp.maximum(per_head, 1)
    tile_at = lambda j: block_at(j % jnp.maximum(per_head, 1))
    first_key = lambda w: ki * cta_keys + w * bk

    def setup(w):
      k0 = first_key(w)
      _copy_in(k_gmem.at[bi, pl.ds(k0, bk), kvh], k_smem.at[w], barrier.at[w])
      _copy_in(v_gmem.at[bi, pl.ds(k0, bk), kvh], v_smem.at[w], barrier.at[w])
      k_seg_rows = (plgpu.load(kseg_gmem.at[bi, pl.ds(k0, bk)], layout=wg.reduce(1),
                               optimized=False) if segments else None)
      zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), wg)
      return (zeros, zeros) + ((_dck_zeros(),) if gated else ()), k_seg_rows

    _dck_zeros = lambda: plgpu.layout_cast(jnp.zeros((bk,), jnp.float32), wg.reduce(1))

    def body(w, k_seg_rows, step, q_smem, do_smem, carry):
      dk, dv, *dck = carry
      k0 = first_key(w)
      h, qi = head_at(step), tile_at(step)
      cols = lambda ref: jax.lax.broadcast_in_dim(
          plgpu.load(ref.at[bi, h, pl.ds(qi * bq, bq)], layout=wg.reduce(0), optimized=False),
          (bk, bq), [1])
      s_t = _smem_product(k_smem.at[w], q_smem, (bk, bq)) * scale  # [keys, queries]
      if gated:  # the bias c_q - c_k, transposed: the queries' sums as columns
        c_rows = plgpu.load(gate_gmem[1].at[bi, h, pl.ds(k0, bk)], layout=wg.reduce(1),
                            optimized=False)
        s_t = s_t + (cols(gate_gmem[0]) - jax.lax.broadcast_in_dim(c_rows, (bk, bq), [0]))

      def keep_fn():
        k_pos = k0 + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=wg)
        q_pos = qi * bq + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=wg)
        q_seg = k_seg = None
        if segments:
          q_seg_cols = plgpu.load(_seg_ref(qseg_gmem, bi, h).at[pl.ds(qi * bq, bq)],
                                  layout=wg.reduce(0), optimized=False)
          q_seg = jax.lax.broadcast_in_dim(q_seg_cols, (bk, bq), [1])
          k_seg = jax.lax.broadcast_in_dim(k_seg_rows, (bk, bq), [0])
        return _tile_mask(q_pos, k_pos, q_seg, k_seg, s_len=s_len, causal=causal, window=window)

      lse_cols = cols(lse_gmem)
      p_t = _unless_whole(whole(qi * bq, k0), lambda keep: _masked(keep, jnp.exp(s_t - lse_cols)),
                          keep_fn)
      dp_t = _smem_product(v_smem.at[w], do_smem, (bk, bq))
      ds_t = p_t * (dp_t - cols(delta_gmem))
      if gated:
        dck = (gate_gradient(w, k0, h, step, dck[0] - ds_t.sum(axis=1)),)
      staging = stage_smem[0].at[w] if stage_smem else None
      dv = dv + _matmul(p_t, do_smem, (bk, d), staging, dtype)
      if not fused_dq:
        return (dk + _matmul(ds_t, q_smem, (bk, d), staging, dtype), dv, *dck)
      # dS (keys as rows) goes to shared memory once: the lhs of dk += dS Q as is, and of dq's
      # share dS^T K transposed (wgmma reads a transposed 16-bit lhs from shared memory).
      ds_smem.at[w][...] = ds_t.astype(dtype)
      plgpu.commit_smem()
      dk = dk + _smem_operand_product(ds_smem.at[w], q_smem, (bk, d))
      dq_share = _smem_operand_product(ds_smem.at[w].T, k_smem.at[w], (bq, d))
      rows = dq_acc.at[w if interpret else 0, bi, pl.ds(qi * bq, bq), h]
      if interpret:  # load + store (see fused_dq above)
        rows[...] = rows[...] + dq_share
      else:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last share has left dq_smem
        dq_smem.at[w][...] = dq_share
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem.at[w], rows, reduction_op="add")
      return (dk, dv, *dck)

    def gate_gradient(w, k0, h, step, dck):
      """dc_k of head h so far; after the head's last tile it goes to memory, and restarts."""
      last = step % jnp.maximum(per_head, 1) == per_head - 1

      @pl.when(last)
      def _store():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last head's has left dck_smem
        dck_smem.at[w][...] = dck
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dck_smem.at[w], dck_gmem.at[bi, h, pl.ds(k0, bk)])
      return jax.lax.cond(last, _dck_zeros, lambda: dck)

    def finish(w, carry):
      dk, dv, *_ = carry
      k_smem.at[w][...] = (dk * scale).astype(dtype)
      v_smem.at[w][...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[w], dk_gmem.at[bi, pl.ds(first_key(w), bk), hh])
      plgpu.copy_smem_to_gmem(v_smem.at[w], dv_gmem.at[bi, pl.ds(first_key(w), bk), hh])
      plgpu.wait_smem_to_gmem(0)

    spec = plgpu.BlockSpec((bq, None, d), lambda j: (tile_at(j), head_at(j), 0),
                           transforms=transforms)
    _warpgroup_pipeline(body, setup, finish, ws=ws, steps=heads_per_cta * per_head,
                        specs=[spec, spec], stages=stages,
                        gmem_refs=(q_gmem.at[bi], do_gmem.at[bi]))

  tile = plgpu.SMEM((n_wg, bk, d), dtype, transforms=transforms)
  scratch = (tile, tile, plgpu.Barrier(num_barriers=n_wg))
  extra = ()
  gated = bool(gates)
  if fused_dq:
    if ranges is not None:
      raise ValueError("fused_dq takes the causal / window formula, not block tables")
    scratch += (plgpu.SMEM((n_wg, bk, bq), dtype, transforms=transforms),
                plgpu.SMEM((n_wg, bq, d), jnp.float32, transforms=_smem_transforms(jnp.float32)))
    extra = (jax.new_ref(jnp.zeros((dq_copies, b, tp, hq, d), jnp.float32)),)
  if stage_in_smem:
    scratch += (plgpu.SMEM((n_wg, bk, bq), dtype, transforms=transforms),)
  if gated:
    scratch += (plgpu.SMEM((n_wg, bk), jnp.float32),)
  out_heads = hkv if ranges is None else hq
  out = jax.ShapeDtypeStruct((b, sp, out_heads, d), dtype)
  out_type = (out, out) + ((jax.ShapeDtypeStruct((b, hq, sp), jnp.float32),) if gated else ())
  dk, dv, *dck = _launch(kernel, out_type=out_type, grid=(sp // cta_keys, out_heads, b),
                         grid_names=("k", "h", "b"), scratch=scratch, ws=ws,
                         interpret=interpret)(q, k, v, do, lse, delta, q_seg, k_seg,
                                              *(() if ranges is None else (ranges,)), *gates,
                                              *extra)
  return (dk, dv, *dck) + ((extra[0][...].sum(axis=0),) if fused_dq else ())


class _Config(StaticConfig):
  def __init__(self, **kw):
    self.kw = kw
    self.key = tuple(sorted((k, id(v) if k == "interpret" else v) for k, v in kw.items()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash_gpu(q, k, v, segment_ids, c, tables, cfg):
  """(out [B, T, Hq, D], lse [B, Hq, T]). c: None, or the gate sums [B, T, Hq] fp32 of causal
  self-attention (bias c_i - c_j; not with a table's q_seg). tables: None, or a dict of int32
  arrays that replace
  the causal / window block ranges: kv_ranges [B, Hq, nq, 2] (each query tile's key blocks)
  and q_ranges [B, Hq, nk, 2] (each key tile's query blocks), or block lists kv_lists
  [B, Hq, nq, 1 + n_max] and q_lists (count, then blocks); and optionally q_seg [B, Hq, T] and
  k_seg [B, S] (then T and S must already be multiples of the tiles; MoBA's routed part)."""
  return _flash_gpu_fwd(q, k, v, segment_ids, c, tables, cfg)[0]


def _tables(tables):
  """(table for the query-major kernels, table for dk/dv, whether they are block lists)."""
  if tables is None:
    return None, None, False
  if "kv_lists" in tables:
    return tables["kv_lists"], tables["q_lists"], True
  return tables["kv_ranges"], tables["q_ranges"], False


WS_FORWARD_ROWS = 64  # query rows per compute warpgroup in the warp-specialised forward


def _warp_specialised(tables, kw) -> bool:
  """Whether the kernels run warp-specialised (the causal / full / window formula only: the
  tables of MoBA and block masks are per 64-row tile)."""
  return tables is None and kw["schedule"] == "ws"  # (table callers set no schedule)


def _fused_backward(tables, kw, d, gated) -> bool:
  """Whether dq comes from the dk/dv kernel (backward="fused"): the formula path only, head
  dims up to 128 (the dq share's fp32 tile and dS outgrow shared memory above), and ungated
  (the gates' gradient needs dS's row sums, which the dq kernel adds up)."""
  return tables is None and kw["backward"] == "fused" and d <= 128 and not gated


def _has_segments(tables, kw) -> bool:
  """Whether the kernels compare segment ids (given ones, or a table's per-head ids); without,
  they mask by position alone and load no ids."""
  return kw["segments"] or (tables is not None and "q_seg" in tables)


def _operands(q, k, v, segment_ids, tables, kw):
  if tables is not None and "q_seg" in tables:
    return q, k, v, tables["q_seg"], tables["k_seg"]
  if _warp_specialised(tables, kw):  # whole CTAs of every kernel, forward and backward
    n = WS_WARPGROUPS
    return pad_for_tiles(q, k, v, segment_ids, math.lcm(n * WS_FORWARD_ROWS, n * kw["bq"]),
                         math.lcm(kw["bk_ws"], n * kw["bk"]))
  return pad_for_tiles(q, k, v, segment_ids, kw["bq"], kw["bk"])


def _kernel_kw(tables, kw) -> dict:
  """The static arguments every kernel of a call shares."""
  return dict(causal=kw["causal"], window=kw["window"], scale=kw["scale"], s_len=kw["s_len"],
              stages=kw["stages"], interpret=kw["interpret"], stage_in_smem=kw["stage_in_smem"],
              segments=_has_segments(tables, kw))


def _gate_operands(c, tp, sp):
  """The gate sums c [B, T, Hq] as the kernels read them: (c_q [B, Hq, Tp], c_k [B, Hq, Sp])
  fp32, zero padded (padded keys are masked, padded queries dropped); () without gates."""
  if c is None:
    return ()
  c = c.astype(jnp.float32).transpose(0, 2, 1)
  return tuple(jnp.pad(c, ((0, 0), (0, 0), (0, n - c.shape[2]))) for n in (tp, sp))


def _flash_gpu_fwd(q, k, v, segment_ids, c, tables, cfg):
  kw = cfg.kw
  t = q.shape[1]
  qp, kp, vp, q_seg, k_seg = _operands(q, k, v, segment_ids, tables, kw)
  gates = _gate_operands(c, qp.shape[1], kp.shape[1])
  kv_table, _, lists = _tables(tables)
  common = _kernel_kw(tables, kw)
  if _warp_specialised(tables, kw):
    o, lse = _forward(qp, kp, vp, q_seg, k_seg, None, gates, bq=WS_FORWARD_ROWS, bk=kw["bk_ws"],
                      ws=True, **common)
  else:
    o, lse = _forward(qp, kp, vp, q_seg, k_seg, kv_table, gates, bq=kw["bq"], bk=kw["bk"],
                      lists=lists, **common)
  return (o[:, :t], lse[:, :, :t]), (qp, kp, vp, q_seg, k_seg, gates, tables, o, lse, t,
                                     k.shape[1])


def _flash_gpu_bwd(cfg, res, cotangents):
  """dq, dk, dv and, gated, dc [B, T, Hq]: (row sums of dS, as query) - (column sums, as key),
  the row sums from the dq kernel, the column sums from the dk/dv kernel. Both are summed from
  the same dS, so their totals over a document cancel, as the exact gradient's do: the first
  gate of a document moves nothing. (The shortcut sum_j dS_ij = dlse_i holds only for delta
  computed from the exact output; from the stored bf16 output each row is off by
  dO_i . (O_i - round(O_i)), and the reverse cumulative sum of the gates' gradient adds those
  errors up over the document: 0.6 against a gradient of 17 at T = 700 on an H200.)"""
  kw = cfg.kw
  qp, kp, vp, q_seg, k_seg, gates, tables, o, lse, t, s = res
  do, dlse = cotangents
  b, tp, hq, d = qp.shape
  hkv = kp.shape[2]
  do_p = jnp.pad(do, ((0, 0), (0, tp - t), (0, 0), (0, 0))).astype(qp.dtype)
  delta = jnp.einsum("bthd,bthd->bht", do_p.astype(jnp.float32), o.astype(jnp.float32))
  delta = delta - jnp.pad(dlse.astype(jnp.float32), ((0, 0), (0, 0), (0, tp - t)))
  # Two warpgroups' resident tiles plus the stream outgrow shared memory above head dim 128.
  common = dict(_kernel_kw(tables, kw), bq=kw["bq"], bk=kw["bk"],
                ws=_warp_specialised(tables, kw) and d <= 128)
  args = (qp, kp, vp, do_p, lse, delta, q_seg, k_seg)
  kv_table, q_table, lists = _tables(tables)
  dcq = None
  if _fused_backward(tables, kw, d, bool(gates)):
    dk, dv, *dck, dq = _dkv(*args, None, gates, fused_dq=True, **common)
    dq = (dq * kw["scale"]).astype(qp.dtype)
  else:
    dq = _dq(*args, kv_table, gates, lists=lists, **common)
    if gates:
      dq, dcq = dq
    dk, dv, *dck = _dkv(*args, q_table, gates, lists=lists, **common)
  fold = lambda x: (x if x.shape[2] == hkv else x.astype(jnp.float32).reshape(
      b, -1, hkv, hq // hkv, d).sum(axis=3).astype(kp.dtype))[:, :s]
  no_grad = None if tables is None else jax.tree.map(lambda _: None, tables)
  dc = None
  if gates:
    dc = (dcq[:, :, :t] + dck[0][:, :, :t]).transpose(0, 2, 1)
  return dq[:, :t], fold(dk), fold(dv), None, dc, no_grad


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
                        alibi_slopes=None, log_gates=None, block_q=64, block_k=64, stages=2,
                        interpret=None, stage_in_smem=None, window=None, schedule="ws",
                        backward="split"):
  """Softmax attention on the Mosaic GPU kernels, forward and backward (custom_vjp).
  q [B, T, Hq, D], k/v [B, S, Hkv, D] in bf16/fp16 (fp32 inputs run with bf16 tensor-core
  operands and fp32 accumulation, and come back as fp32), D in 64..256 (a multiple of 64).
  log_gates [B, T, Hq] / alibi_slopes [Hq]: the forget-gate bias of blockwise_attention (causal
  self-attention), on every schedule and backward, differentiable in log_gates.
  schedule: "ws" runs every kernel warp-specialised (FlashAttention-3's: per CTA two compute
  warpgroups and a producer warpgroup that streams the tiles by TMA), "one_warpgroup" one
  warpgroup per CTA with a software pipeline. block_q, block_k: each warpgroup's tiles in the
  backward and in the "one_warpgroup" forward; the "ws" forward gives each warpgroup 64 query
  rows and streams key tiles of 128 (64 above head dim 128); above head dim 128 the backward
  runs "one_warpgroup" (two warpgroups' tiles would outgrow shared memory).
  backward: "split" (FlashAttention-2's: a dq kernel and a dk/dv kernel) or "fused"
  (FlashAttention-3's: the dk/dv kernel also adds each tile's dq share into fp32 memory by TMA
  reduce-add; 5 matmuls per tile instead of 7; head dims up to 128 and ungated, "split"
  otherwise).
  interpret=plgpu.InterpretGPUParams() runs it on the CPU; stage_in_smem (default: only when
  interpreting) feeds register operands of wgmma through shared memory."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
  if backward not in BACKWARDS:
    raise ValueError(f"backward={backward!r} is not one of {', '.join(BACKWARDS)}")
  c = kernel_gates(log_gates, alibi_slopes, q, k, segment_ids, causal=causal,
                   name="the Mosaic GPU attention kernel")
  if q.dtype == jnp.float32 and k.dtype == v.dtype == jnp.float32:
    out = flash_attention_gpu(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                              v.astype(jnp.bfloat16), causal=causal, segment_ids=segment_ids,
                              sm_scale=sm_scale, log_gates=log_gates, alibi_slopes=alibi_slopes,
                              block_q=block_q, block_k=block_k, stages=stages,
                              interpret=interpret, stage_in_smem=stage_in_smem, window=window,
                              schedule=schedule, backward=backward)
    return out.astype(jnp.float32)
  d = q.shape[-1]
  _check(q, k, v, block_q, block_k)
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f"window={window!r} must be a positive int")
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  cfg = _Config(causal=causal, window=window, scale=scale,
                s_len=k.shape[1], bq=block_q, bk=block_k, stages=stages, interpret=interpret,
                stage_in_smem=bool(interpret) if stage_in_smem is None else stage_in_smem,
                schedule=schedule, backward=backward, bk_ws=128 if d <= 128 else 64,
                segments=segment_ids is not None)
  return _flash_gpu(q, k, v, segment_ids, c, None, cfg)[0]
