"""Flash attention as Pallas TPU (Mosaic) kernels driven by block lists: forward, and a backward
in two kernels (dq; dk and dv). One parameterised kernel serves dense causal or full attention
and the sparse patterns (a sliding window, any static block mask): the caller says which key
blocks each query block visits, and only those are loaded and computed.

Layout inside: [B, H, T, D] (the wrapper transposes). Grid (batch, head, query block, list
slot): slot j of query block i is key block idx[i, j], scalar-prefetched, so its DMA is issued
from the list; slots past the list's length repeat the last block (no new copy) and do no work.
The running max, sum and accumulator live in VMEM scratch across the slots. The dk/dv kernel
walks the transposed lists (for each key block, the query blocks that visit it) once per query
head of the key/value head's group, so dk and dv sum over the group in VMEM. Index maps send
query head h to key/value head h // (Hq // Hkv): no head is repeated in memory, gradients
included. Inside a tile,
causality, the window, segment ids and the padded tail (any length works) are masked by
position.

The forget-gate bias (FoX's log_gates; ALiBi as constant gates) enters each tile as c_q - c_k,
from per-block slices of the gates' running sums c [B, T, Hq] (a column per query block, a row
per key block). Its gradient: the queries' share is the row sums of dS (the dq kernel adds them
up), the keys' minus the column sums, which the dk/dv kernel adds up per query head.

On the CPU the same kernels run in TPU interpret mode (impl="interpret"), which is how they are
tested.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (alibi_log_gates, cdiv, gate_cumsum, pad_for_tiles,
                                    StaticConfig)

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK = 128
SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _dot(a, b, contract_a=1, contract_b=0):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


# ---- block lists ---------------------------------------------------------------------------------

def dense_block_keep(nq: int, nk: int, bq: int, bk: int, causal: bool) -> np.ndarray:
  """[nq, nk]: the key blocks dense attention visits (all, or those causality leaves)."""
  if not causal:
    return np.ones((nq, nk), bool)
  return (np.arange(nk)[None, :] * bk) <= (np.arange(nq)[:, None] * bq + bq - 1)


def block_keep_for(nq: int, nk: int, bq: int, bk: int, *, causal: bool,
                   window: int | None = None) -> np.ndarray:
  """[nq, nk]: dense (causal or not) block visibility, narrowed to the band of a window: key
  block j is kept when it can hold a key within the window of some query of block i."""
  keep = dense_block_keep(nq, nk, bq, bk, causal)
  if window is not None:
    i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
    keep &= (j * bk + bk - 1 > i * bq - window) & (j * bk < i * bq + bq - 1 + window)
  return keep


def lists_from_keep(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Row-wise lists of kept columns: (idx [rows, n_max] int32 padded with the row's last kept
  column, count [rows] int32)."""
  n_max = max(int(keep.sum(axis=1).max()), 1)
  idx = np.zeros((keep.shape[0], n_max), np.int32)
  count = keep.sum(axis=1).astype(np.int32)
  for r in range(keep.shape[0]):
    cols = np.flatnonzero(keep[r])
    if len(cols):
      idx[r, :len(cols)] = cols
      idx[r, len(cols):] = cols[-1]
  return idx, count


# ---- kernels -------------------------------------------------------------------------------------

def _mask(qi, ki, q_seg, k_seg, *, bq, bk, causal, window, s_len):
  """[bq, bk] keep-mask of one tile; q_seg a column [bq, 1], k_seg a row [1, bk] (as their
  blocks arrive: no vector changes orientation in the kernel, which Mosaic would relayout)."""
  q_pos = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  keep = (k_pos < s_len) & (q_seg == k_seg)
  if causal:
    keep = keep & (k_pos <= q_pos)
  if window is not None:
    keep = keep & (jnp.abs(q_pos - k_pos) < window)
  return keep


def _scores(q_ref, k_ref, gate_refs, scale):
  """The tile's logits [bq, bk] in fp32: q k^T * scale, plus the gate bias c_q - c_k (c_q a
  column [bq, 1] of the query rows, c_k a row [1, bk] of the keys) when gated."""
  s = _dot(q_ref[...], k_ref[...], 1, 1) * scale
  if gate_refs is None:
    return s
  cq_ref, ck_ref = gate_refs
  return s + (cq_ref[...] - ck_ref[...])


def _gate_refs(refs, gated):
  """(the gate refs (c_q, c_k) or None, the other refs)."""
  return (tuple(refs[:2]), refs[2:]) if gated else (None, refs)


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, *refs, scale, mask,
                gated):
  gate_refs, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _gate_refs(refs, gated)
  qi, j = pl.program_id(2), pl.program_id(3)
  ki = idx_ref[qi, j]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(j < cnt_ref[qi])
  def _body():
    keep = mask(qi, ki, qs_ref[...], ks_ref[...])
    # Masked logits become the finite MASK_VALUE (the running max stays finite: no
    # -inf - -inf), and their weights are zeroed by `where`, not left to exp's underflow: a
    # tile with nothing kept, or whose weights all underflow (strong decay), adds exact zeros.
    s = jnp.where(keep, _scores(q_ref, k_ref, gate_refs, scale), MASK_VALUE)  # [bq, bk]
    m_prev = m_scr[...]  # [bq, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
    m_scr[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc_scr[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m_scr[...] + jnp.log(safe))


def _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                       gate_refs, qi, ki, *, scale, mask):
  """The recomputed probabilities p [bq, bk] of a tile and the score gradients ds = p (dp -
  delta), from the saved log-sum-exp (FlashAttention-2's backward)."""
  keep = mask(qi, ki, qs_ref[...], ks_ref[...])
  s = jnp.where(keep, _scores(q_ref, k_ref, gate_refs, scale), MASK_VALUE)
  p = jnp.where(keep, jnp.exp(s - lse_ref[...]), 0.0)
  dp = _dot(do_ref[...], v_ref[...], 1, 1)
  return p, p * (dp - delta_ref[...])


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
               *refs, scale, mask, gated):
  """dq of one query block; gated, also the queries' gate gradient dc_q = the row sums of dS, a
  [bq, 1] output block resident across the key slots."""
  gate_refs, refs = _gate_refs(refs, gated)
  dq_ref, dcq_ref, dq_scr = refs if gated else (refs[0], None, refs[1])
  qi, j = pl.program_id(2), pl.program_id(3)
  ki = idx_ref[qi, j]

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if gated:
      dcq_ref[...] = jnp.zeros(dcq_ref.shape, jnp.float32)

  @pl.when(j < cnt_ref[qi])
  def _body():
    _, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                               gate_refs, qi, ki, scale=scale, mask=mask)
    dq_scr[...] += _dot(ds.astype(k_ref.dtype), k_ref[...]) * scale
    if gated:
      dcq_ref[...] += jnp.sum(ds, axis=1, keepdims=True)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                *refs, scale, mask, n_slots, gated):
  """One key block of one key/value head; slot j walks query head j // n_slots of the group
  and query block idx[ki, j % n_slots], so dk and dv sum over the group in VMEM. Gated, it
  also writes the keys' gate gradient dc_k = -(column sums of dS) per query head: a [1, bk]
  output block that stays resident while its head's slots run."""
  gate_refs, refs = _gate_refs(refs, gated)
  if gated:
    dk_ref, dv_ref, dck_ref, dk_scr, dv_scr = refs
  else:
    dk_ref, dv_ref, dk_scr, dv_scr = refs
  ki, j = pl.program_id(2), pl.program_id(3)
  slot = j % n_slots
  qi = idx_ref[ki, slot]

  @pl.when(j == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  if gated:
    @pl.when(slot == 0)  # a new query head's output block
    def _init_head():
      dck_ref[...] = jnp.zeros(dck_ref.shape, jnp.float32)

  @pl.when(slot < cnt_ref[ki])
  def _body():
    p, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                               gate_refs, qi, ki, scale=scale, mask=mask)
    dv_scr[...] += _dot(p.astype(do_ref.dtype), do_ref[...], 0, 0)  # p^T do
    dk_scr[...] += _dot(ds.astype(q_ref.dtype), q_ref[...], 0, 0) * scale  # ds^T q
    if gated:
      dck_ref[...] -= jnp.sum(ds, axis=0, keepdims=True)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---- pallas_call plumbing -----------------------------------------------------------------------

def _specs(bq, bk, d, group, *, kv_major: bool, n_slots: int = 0):
  """BlockSpecs of (q, k, q segments, k segments, per-query rows, per-key rows) for grid (b, h,
  outer, slot) with scalar-prefetched (idx, count). Query-major: h is the query head, outer the
  query block and idx[outer, slot] the key block. kv_major (the dk/dv kernel): h is the
  key/value head, outer the key block, and slot runs over the group's query heads x the n_slots
  list slots. Per-query rows are columns [bq, 1] of [B, Hq, T, 1] (lse, delta, the queries'
  gate sums); per-key rows are rows [1, bk] of [B, Hq, 1, S] (the keys' gate sums, per query
  head)."""
  if kv_major:
    qh = lambda h, j: h * group + j // n_slots
    kh = lambda h, j: h
    qb = lambda i, j, idx: idx[i, j % n_slots]
    kb = lambda i, j, idx: i
  else:
    qh = lambda h, j: h
    kh = lambda h, j: h // group
    qb = lambda i, j, idx: i
    kb = lambda i, j, idx: idx[i, j]
  q = pl.BlockSpec((None, None, bq, d),
                   lambda b, h, i, j, idx, cnt: (b, qh(h, j), qb(i, j, idx), 0))
  k = pl.BlockSpec((None, None, bk, d),
                   lambda b, h, i, j, idx, cnt: (b, kh(h, j), kb(i, j, idx), 0))
  qs = pl.BlockSpec((None, bq, 1), lambda b, h, i, j, idx, cnt: (b, qb(i, j, idx), 0))
  ks = pl.BlockSpec((None, 1, bk), lambda b, h, i, j, idx, cnt: (b, 0, kb(i, j, idx)))
  row = pl.BlockSpec((None, None, bq, 1),
                     lambda b, h, i, j, idx, cnt: (b, qh(h, j), qb(i, j, idx), 0))
  key_row = pl.BlockSpec((None, None, 1, bk),
                         lambda b, h, i, j, idx, cnt: (b, qh(h, j), 0, kb(i, j, idx)))
  return q, k, qs, ks, row, key_row


def _call(kernel, grid, lists, in_specs, out_specs, out_shape, scratch, interpret, name, *args):
  idx, cnt = lists
  spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                      out_specs=out_specs, scratch_shapes=scratch)
  return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
                        interpret=interpret, name=name)(jnp.asarray(idx), jnp.asarray(cnt), *args)


def _block_size(n: int, block: int) -> int:
  return min(block, max(8, -(-n // 8) * 8))


def _prepare(q, k, v, segment_ids, c, bq, bk):
  """Padded q, k, v as [B, H, T, D], query segment ids as columns [B, T, 1], key segment ids as
  rows [B, 1, S], and the gate sums c [B, T, Hq] (or None) as the queries' columns
  [B, Hq, T, 1] and the keys' rows [B, Hq, 1, S] (padding 0: padded keys are masked, padded
  queries dropped)."""
  q, k, v, q_seg, k_seg = pad_for_tiles(q, k, v, segment_ids, bq, bk)
  to_bhtd = lambda x: x.transpose(0, 2, 1, 3)
  gates = ()
  if c is not None:
    c = c.astype(jnp.float32).transpose(0, 2, 1)  # [B, Hq, T]
    pad = lambda n: jnp.pad(c, ((0, 0), (0, 0), (0, n - c.shape[2])))
    gates = (pad(q.shape[1])[..., None], pad(k.shape[1])[:, :, None, :])
  return (to_bhtd(q), to_bhtd(k), to_bhtd(v), q_seg[..., None], k_seg[:, None, :]), gates


def _forward(q, k, v, segment_ids, c, lists, cfg):
  b, t, hq, d = q.shape
  fwd_lists, _ = lists
  (qt, kt, vt, q_seg, k_seg), gates = _prepare(q, k, v, segment_ids, c, cfg.bq, cfg.bk)
  group = hq // k.shape[2]
  nq = qt.shape[2] // cfg.bq
  qspec, kspec, qsspec, ksspec, row, key_row = _specs(cfg.bq, cfg.bk, d, group, kv_major=False)
  gated = bool(gates)
  o, lse = _call(
      functools.partial(_fwd_kernel, scale=cfg.scale, mask=cfg.mask, gated=gated),
      (b, hq, nq, fwd_lists[0].shape[1]), fwd_lists,
      [qspec, kspec, kspec, qsspec, ksspec] + [row, key_row] * gated, [qspec, row],
      [jax.ShapeDtypeStruct(qt.shape, q.dtype),
       jax.ShapeDtypeStruct(qt.shape[:3] + (1,), jnp.float32)],
      [pltpu.VMEM((cfg.bq, 1), jnp.float32), pltpu.VMEM((cfg.bq, 1), jnp.float32),
       pltpu.VMEM((cfg.bq, d), jnp.float32)],
      cfg.interpret, "lmtrain_flash_fwd", qt, kt, vt, q_seg, k_seg, *gates)
  outs = (o[:, :, :t].transpose(0, 2, 1, 3), lse[:, :, :t, 0])
  return outs, (qt, kt, vt, q_seg, k_seg, gates, o, lse)


def _backward(res, lists, cotangents, cfg, shapes):
  """cotangents: of the output [B, T, Hq, D] and of the log-sum-exp [B, Hq, T]; the latter
  enters as -dlse in delta (d lse / d s = p). Returns dq, dk, dv and the gate sums' gradient
  dc [B, T, Hq] (None ungated). A logit's bias is c_i - c_j, so dc = (row sums of dS, as
  query) - (column sums of dS, as key), from the dq and the dk/dv kernel. Both sum the same dS,
  so their totals over a document cancel as the exact gradient's do. (Taking the row sums as
  dlse, as softmax's rows sum to one, is exact only with delta from the exact output: from the
  stored bf16 output each row is off by dO_i . (O_i - round(O_i)), and the gates' reverse
  cumulative sum adds those errors up over the document.)"""
  qt, kt, vt, q_seg, k_seg, gates, o, lse = res
  do, dlse = cotangents
  fwd_lists, bwd_lists = lists
  b, t, hq, d = shapes
  hkv = kt.shape[1]
  group = hq // hkv
  tp = qt.shape[2]
  gated = bool(gates)
  do_t = jnp.pad(do, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  delta = jnp.sum(do_t.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  delta = delta - jnp.pad(dlse.astype(jnp.float32), ((0, 0), (0, 0), (0, tp - t)))[..., None]
  nq, nk = tp // cfg.bq, kt.shape[2] // cfg.bk
  kw = dict(scale=cfg.scale, mask=cfg.mask, gated=gated)
  args = (qt, kt, vt, q_seg, k_seg, do_t, lse, delta, *gates)
  qspec, kspec, qsspec, ksspec, row, key_row = _specs(cfg.bq, cfg.bk, d, group, kv_major=False)
  dq_shape = jax.ShapeDtypeStruct(qt.shape, qt.dtype)
  dq, *dcq = _call(functools.partial(_dq_kernel, **kw), (b, hq, nq, fwd_lists[0].shape[1]),
                   fwd_lists, [qspec, kspec, kspec, qsspec, ksspec, qspec, row, row]
                   + [row, key_row] * gated, [qspec] + [row] * gated,
                   [dq_shape] + [jax.ShapeDtypeStruct(lse.shape, jnp.float32)] * gated,
                   [pltpu.VMEM((cfg.bq, d), jnp.float32)], cfg.interpret, "lmtrain_flash_dq",
                   *args)
  n_slots = bwd_lists[0].shape[1]
  qspec, kspec, qsspec, ksspec, row, key_row = _specs(cfg.bq, cfg.bk, d, group, kv_major=True,
                                                      n_slots=n_slots)
  out_specs = [kspec, kspec] + [key_row] * gated
  out_shapes = [jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)]
  if gated:
    out_shapes.append(jax.ShapeDtypeStruct((b, hq, 1, kt.shape[2]), jnp.float32))
  # One program per key block and key/value head: the group's query heads are consecutive
  # slots, so dk and dv are summed over the group in VMEM (no per-query-head copies).
  dk, dv, *dck = _call(functools.partial(_dkv_kernel, n_slots=n_slots, **kw),
                       (b, hkv, nk, group * n_slots), bwd_lists,
                       [qspec, kspec, kspec, qsspec, ksspec, qspec, row, row]
                       + [row, key_row] * gated, out_specs, out_shapes,
                       [pltpu.VMEM((cfg.bk, d), jnp.float32),
                        pltpu.VMEM((cfg.bk, d), jnp.float32)],
                       cfg.interpret, "lmtrain_flash_dkv", *args)
  unpad = lambda x: x[:, :, :cfg.s_len].transpose(0, 2, 1, 3)
  dc = None
  if gated:
    dc = (dcq[0][:, :, :t, 0] + dck[0][:, :, 0, :t]).transpose(0, 2, 1)
  return dq[:, :, :t].transpose(0, 2, 1, 3), unpad(dk), unpad(dv), dc


class _Config(StaticConfig):
  """Everything static about one call: blocks, mask, scale (hashable by its key, so jax's
  custom_vjp sees it as one nondiff argument). The block lists travel as arguments."""

  def __init__(self, *, t, s, bq, bk, causal, window, scale, interpret, key):
    self.bq, self.bk, self.s_len, self.scale, self.interpret = bq, bk, s, scale, interpret
    self.mask = functools.partial(_mask, bq=bq, bk=bk, causal=causal, window=window, s_len=s)
    self.key = (t, s, bq, bk, causal, window, scale, id(interpret), key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, segment_ids, c, lists, cfg):
  """(out [B, T, Hq, D], lse [B, Hq, T] fp32; +inf where a query sees no key). c: the gate
  sums [B, T, Hq] (causal self-attention: the bias c_i - c_j), or None."""
  return _forward(q, k, v, segment_ids, c, lists, cfg)[0]


def _flash_fwd(q, k, v, segment_ids, c, lists, cfg):
  outs, res = _forward(q, k, v, segment_ids, c, lists, cfg)
  return outs, (res, lists, q.shape)


def _flash_bwd(cfg, saved, cotangents):
  res, lists, shapes = saved
  dq, dk, dv, dc = _backward(res, lists, cotangents, cfg, shapes)
  no_grad = jax.tree.map(lambda _: None, lists)
  return dq, dk, dv, None, dc, no_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def _static_lists(keep):
  """(forward lists, transposed lists for dk/dv) of a static [nq, nk] keep, as arrays."""
  return (tuple(map(jnp.asarray, lists_from_keep(keep))),
          tuple(map(jnp.asarray, lists_from_keep(keep.T))))


def kernel_gates(log_gates, alibi_slopes, q, k, segment_ids, *, causal, name):
  """The kernels' gate sums c [B, T, Hq] fp32 (or None) from log_gates and/or ALiBi (its
  constant gates): the bias c_i - c_j of causal self-attention. Anything else is a one-line
  ValueError (ALiBi without causality runs on impl='reference' or 'xla')."""
  if log_gates is None and alibi_slopes is None:
    return None
  what = "log_gates" if log_gates is not None else "alibi_slopes"
  if not causal or q.shape[1] != k.shape[1]:
    raise ValueError(f"{name} takes {what} only for causal self-attention (T == S); use "
                     "impl='reference' or 'xla'")
  b, t, hq = q.shape[:3]
  if log_gates is not None and log_gates.shape != (b, t, hq):
    raise ValueError(f"{name}: log_gates{log_gates.shape} must be [B, T, Hq] = {(b, t, hq)}")
  gates = jnp.zeros((b, t, hq), jnp.float32)
  if log_gates is not None:
    gates = gates + log_gates.astype(jnp.float32)
  if alibi_slopes is not None:
    gates = gates + alibi_log_gates(alibi_slopes.astype(jnp.float32), b, t)
  return gate_cumsum(gates, segment_ids)


def flash_attention_tpu(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, log_gates=None, interpret=None,
                        block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK, window=None,
                        block_keep=None):
  """The TPU kernel. window: keep |t - s| < window (with causal: a sliding window);
  block_keep: a static boolean [ceil(T/bq), ceil(S/bk)] of the key blocks each query block may
  visit (and-ed with causality at block level). log_gates [B, T, Hq] / alibi_slopes [Hq]: the
  forget-gate bias of blockwise_attention (causal self-attention), differentiable in
  log_gates. interpret=pltpu.InterpretParams() runs it on the CPU."""
  c = kernel_gates(log_gates, alibi_slopes, q, k, segment_ids, causal=causal,
                   name="the Pallas TPU attention kernel")
  t, s = q.shape[1], k.shape[1]
  bq, bk = _block_size(t, block_q), _block_size(s, block_k)
  nq, nk = cdiv(t, bq), cdiv(s, bk)
  keep = block_keep_for(nq, nk, bq, bk, causal=causal, window=window)
  if block_keep is not None:
    block_keep = np.asarray(block_keep, bool)
    if block_keep.shape != (nq, nk):
      raise ValueError(f"block_keep{block_keep.shape} does not fit T={t}, S={s} with blocks "
                       f"{bq}x{bk} (needs {(nq, nk)})")
    keep &= block_keep
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  cfg = _Config(t=t, s=s, bq=bq, bk=bk, causal=causal, window=window, scale=scale,
                interpret=interpret or False, key=(keep.tobytes(), keep.shape))
  return _flash(q, k, v, segment_ids, c, _static_lists(keep), cfg)[0]
