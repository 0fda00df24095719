"""Flash attention as Pallas TPU (Mosaic) kernels: forward, and a backward in two kernels (dq;
dk and dv), for causal or full attention with GQA, segment ids and any length.

Layout inside: [B, H, T, D] (the wrapper transposes), grid (batch, head, query block, key block)
with the key axis innermost ("arbitrary"): running max, sum and accumulator live in VMEM
scratch across it. Key blocks that causality hides entirely are skipped (pl.when), and the
index maps of k and v send query head h to key/value head h // (Hq // Hkv), so no head is
repeated in memory. The tail of a length that is not a multiple of the block is padded and
masked by position.

On the CPU the same kernels run in TPU interpret mode (impl="interpret"), which is how they
are tested.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import cdiv

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK = 128


def _dot(a, b, contract_a=1, contract_b=0):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _mask(qi, ki, bq, bk, q_seg, k_seg, *, causal, s_len):
  q_pos = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  keep = (k_pos < s_len) & (q_seg[:, None] == k_seg[None, :])
  if causal:
    keep = keep & (k_pos <= q_pos)
  return keep


def _visible(qi, ki, bq, bk, causal):
  """False when causality hides the whole (query block, key block) tile: skip its work."""
  return (ki * bk <= qi * bq + bq - 1) if causal else True


# ---- forward -----------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                scale, causal, bq, bk, s_len):
  qi, ki = pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(_visible(qi, ki, bq, bk, causal))
  def _body():
    s = _dot(q_ref[...], k_ref[...], 1, 1) * scale  # [bq, bk]
    keep = _mask(qi, ki, bq, bk, qs_ref[...][:, 0], ks_ref[...][:, 0], causal=causal,
                 s_len=s_len)
    s = jnp.where(keep, s, MASK_VALUE)
    m_prev = m_scr[...]  # [bq, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
    m_scr[...] = m_new

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc_scr[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m_scr[...] + jnp.log(safe))


# ---- backward ----------------------------------------------------------------------------------

def _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, qi, ki,
                       *, scale, causal, bq, bk, s_len):
  """The recomputed probabilities p [bq, bk] of a tile and the score gradients ds = p (dp -
  delta), from the saved log-sum-exp (FlashAttention-2's backward)."""
  s = _dot(q_ref[...], k_ref[...], 1, 1) * scale
  keep = _mask(qi, ki, bq, bk, qs_ref[...][:, 0], ks_ref[...][:, 0], causal=causal, s_len=s_len)
  p = jnp.where(keep, jnp.exp(s - lse_ref[...]), 0.0)
  dp = _dot(do_ref[...], v_ref[...], 1, 1)
  return p, p * (dp - delta_ref[...])


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr,
               *, scale, causal, bq, bk, s_len):
  qi, ki = pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(_visible(qi, ki, bq, bk, causal))
  def _body():
    _, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                               qi, ki, scale=scale, causal=causal, bq=bq, bk=bk, s_len=s_len)
    dq_scr[...] += _dot(ds.astype(k_ref.dtype), k_ref[...]) * scale

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, scale, causal, bq, bk, s_len):
  ki, qi = pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(_visible(qi, ki, bq, bk, causal))
  def _body():
    p, ds = _probs_and_dscores(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                               qi, ki, scale=scale, causal=causal, bq=bq, bk=bk, s_len=s_len)
    dv_scr[...] += _dot(p.astype(do_ref.dtype), do_ref[...], 0, 0)  # p^T do
    dk_scr[...] += _dot(ds.astype(q_ref.dtype), q_ref[...], 0, 0) * scale  # ds^T q

  @pl.when(qi == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---- wrapper -----------------------------------------------------------------------------------

def _specs(bq, bk, d, group, *, kv_major: bool):
  """BlockSpecs of q, k, v, q segments, k segments, for grid (b, h, i, j): i indexes query
  blocks and j key blocks, or the reverse when kv_major (the dk/dv kernel)."""
  if kv_major:
    qmap = lambda b, h, j, i: (b, h, i, 0)
    kmap = lambda b, h, j, i: (b, h // group, j, 0)
    qsmap = lambda b, h, j, i: (b, i, 0)
    ksmap = lambda b, h, j, i: (b, j, 0)
  else:
    qmap = lambda b, h, i, j: (b, h, i, 0)
    kmap = lambda b, h, i, j: (b, h // group, j, 0)
    qsmap = lambda b, h, i, j: (b, i, 0)
    ksmap = lambda b, h, i, j: (b, j, 0)
  q = pl.BlockSpec((None, None, bq, d), qmap)
  k = pl.BlockSpec((None, None, bk, d), kmap)
  qs = pl.BlockSpec((None, bq, 1), qsmap)
  ks = pl.BlockSpec((None, bk, 1), ksmap)
  row = pl.BlockSpec((None, None, bq, 1), qmap)  # lse, delta: one value per query
  return q, k, qs, ks, row


def _block_size(n: int, block: int) -> int:
  return min(block, max(8, -(-n // 8) * 8))


def _prepare(q, k, v, segment_ids, block_q, block_k):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = _block_size(t, block_q), _block_size(s, block_k)
  tp, sp = cdiv(t, bq) * bq, cdiv(s, bk) * bk
  to_bhtd = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  q_seg = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=-1)[..., None]
  k_seg = jnp.pad(seg if segment_ids is not None else jnp.zeros((b, s), jnp.int32),
                  ((0, 0), (0, sp - s)), constant_values=-2)[..., None]
  return (to_bhtd(q, tp), to_bhtd(k, sp), to_bhtd(v, sp), q_seg, k_seg, bq, bk, hq // hkv)


def _forward(q, k, v, segment_ids, *, causal, scale, block_q, block_k, interpret):
  b, t, hq, d = q.shape
  s = k.shape[1]
  qt, kt, vt, q_seg, k_seg, bq, bk, group = _prepare(q, k, v, segment_ids, block_q, block_k)
  grid = (b, hq, qt.shape[2] // bq, kt.shape[2] // bk)
  qspec, kspec, qsspec, ksspec, row = _specs(bq, bk, d, group, kv_major=False)
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk, s_len=s)
  o, lse = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[qspec, kspec, kspec, qsspec, ksspec],
      out_specs=[qspec, row],
      out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                 jax.ShapeDtypeStruct(qt.shape[:3] + (1,), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="lmtrain_flash_fwd",
  )(qt, kt, vt, q_seg, k_seg)
  return o[:, :, :t].transpose(0, 2, 1, 3), (qt, kt, vt, q_seg, k_seg, o, lse, bq, bk, group)


def _backward(res, do, *, causal, scale, s_len, interpret, shapes):
  qt, kt, vt, q_seg, k_seg, o, lse, bq, bk, group = res
  b, t, hq, d = shapes
  hkv = kt.shape[1]
  do_t = jnp.pad(do, ((0, 0), (0, qt.shape[2] - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  delta = jnp.sum(do_t.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  nq, nk = qt.shape[2] // bq, kt.shape[2] // bk
  kw = dict(scale=scale, causal=causal, bq=bq, bk=bk, s_len=s_len)
  qspec, kspec, qsspec, ksspec, row = _specs(bq, bk, d, group, kv_major=False)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw), grid=(b, hq, nq, nk),
      in_specs=[qspec, kspec, kspec, qsspec, ksspec, qspec, row, row], out_specs=qspec,
      out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="lmtrain_flash_dq",
  )(qt, kt, vt, q_seg, k_seg, do_t, lse, delta)
  qspec, kspec, qsspec, ksspec, row = _specs(bq, bk, d, group, kv_major=True)
  # dk and dv per query head (kv-major grid over key blocks), summed over each group below.
  dkv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, i: (b_, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kw), grid=(b, hq, nk, nq),
      in_specs=[qspec, kspec, kspec, qsspec, ksspec, qspec, row, row],
      out_specs=[dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, hq, kt.shape[2], d), jnp.float32)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="lmtrain_flash_dkv",
  )(qt, kt, vt, q_seg, k_seg, do_t, lse, delta)
  fold = lambda x: x.reshape(b, hkv, group, -1, d).sum(axis=2)[:, :, :s_len].transpose(0, 2, 1, 3)
  dq = dq[:, :, :t].transpose(0, 2, 1, 3)
  return dq, fold(dk).astype(kt.dtype), fold(dv).astype(vt.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, segment_ids, causal, scale, block_q, block_k, interpret):
  return _forward(q, k, v, segment_ids, causal=causal, scale=scale, block_q=block_q,
                  block_k=block_k, interpret=interpret)[0]


def _flash_fwd(q, k, v, segment_ids, causal, scale, block_q, block_k, interpret):
  o, res = _forward(q, k, v, segment_ids, causal=causal, scale=scale, block_q=block_q,
                    block_k=block_k, interpret=interpret)
  return o, (res, q.shape, k.shape[1])


def _flash_bwd(causal, scale, block_q, block_k, interpret, saved, do):
  res, shapes, s_len = saved
  dq, dk, dv = _backward(res, do, causal=causal, scale=scale, s_len=s_len, interpret=interpret,
                         shapes=shapes)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        alibi_slopes=None, interpret=None, block_q=DEFAULT_BLOCK,
                        block_k=DEFAULT_BLOCK):
  """The TPU kernel; interpret=pltpu.InterpretParams() runs it on the CPU."""
  if alibi_slopes is not None:
    raise ValueError("blockwise_attention: the Pallas TPU kernel does not take alibi_slopes yet "
                     "(use impl='reference' or 'xla')")
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  return _flash(q, k, v, segment_ids, causal, scale, block_q, block_k, interpret or False)
