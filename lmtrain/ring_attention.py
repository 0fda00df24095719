"""Ring attention: causal softmax attention with the sequence sharded over the "sequence" mesh
axis (context parallelism), forward and backward.

Each device keeps its queries and passes its keys and values around the ring (ppermute); an
online softmax accumulates the result as the blocks come by. The backward pass is a second ring
(FlashAttention-2 style, recomputing probabilities from the saved log-sum-exp) in which the
key/value gradients travel with their blocks and arrive home after a full turn.

Load balancing: with a causal mask, device i of a contiguous split would do i + 1 blocks of
work. The trainer lays the sequence out zigzag (`zigzag_permutation`): device i holds chunks i
and 2n - 1 - i, so every device does the same work (as maxtext's context_parallel_load_balance
and ring-flash-attention's zigzag ring). Each step computes only the half-blocks causality
keeps: with the keys of device j (chunks j and 2n - 1 - j), device i's queries all see chunk j
and none see chunk 2n - 1 - j when j < i; when j > i only its late chunk (2n - 1 - i) sees
anything, and it sees both. So a device computes 2n + 1 of the 4n half-block pairs (3 on its
own block, 2 per other step): the causal half, as in ring-flash-attention. Masking uses each
token's global row index, so results do not depend on the layout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels._common import group_queries, ungroup_queries

SEQUENCE_AXIS = "sequence"


def zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
  """Column order such that shard i holds chunks i and 2n - 1 - i of the sequence."""
  if seq_len % (2 * num_shards):
    raise ValueError(f"sequence parallelism over {num_shards} devices needs data.seq_len "
                     f"divisible by {2 * num_shards}; got {seq_len}")
  c = seq_len // (2 * num_shards)
  chunks = np.arange(seq_len).reshape(2 * num_shards, c)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]])
                         for i in range(num_shards)])


def local_rows(seq_len: int, num_shards: int, shard):
  """Global row indices of the tokens a shard holds under the zigzag layout: [seq_len / n]."""
  c = seq_len // (2 * num_shards)
  first = shard * c + jnp.arange(c)
  second = (2 * num_shards - 1 - shard) * c + jnp.arange(c)
  return jnp.concatenate([first, second])


def _block(q5, k, seg_q, seg_k, row_q, row_k, scale):
  """Logits [B, Tq, K, G, Tk] (fp32) and the causal + segment keep mask."""
  logits = jnp.einsum("btkgd,bskd->btkgs", q5, k, preferred_element_type=jnp.float32) * scale
  keep = (row_k[None, :] <= row_q[:, None])[None] & (seg_q[:, :, None] == seg_k[:, None, :])
  return logits, keep[:, :, None, None, :]


def _case(rows_q, rows_k):
  """0: the device's own block (keys j == i); 1: keys from an earlier device (j < i: every query
  sees the first key half only); 2: keys from a later device (j > i: only the second query
  half sees anything, all of it). rows_* are the zigzag rows of the two devices."""
  i, j = rows_q[0], rows_k[0]  # each device's first row is chunk index * chunk length
  return jnp.where(j == i, 0, jnp.where(j < i, 1, 2))


HALF_PAIRS = (3, 2, 2)  # half-block pairs computed in each case (own: q0k0, q1k0, q1k1)


def _ring_forward(q, k, v, seg, rows, axis_name, scale):
  n = jax.lax.psum(1, axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]
  hkv = k.shape[2]
  q5 = group_queries(q, hkv)
  b, t, _, g, d = q5.shape
  m = jnp.full((b, t, hkv, g), -jnp.inf, jnp.float32)
  l = jnp.zeros((b, t, hkv, g), jnp.float32)
  acc = jnp.zeros((b, t, hkv, g, d), jnp.float32)

  h = t // 2  # the zigzag halves: chunk i, then chunk 2n - 1 - i

  def update(carry, q5_, seg_q, rows_q, k_b, v_b, seg_b, rows_b):
    m, l, acc = carry
    logits, keep = _block(q5_, k_b, seg_q, seg_b, rows_q, rows_b, scale)
    m_new = jnp.maximum(m, jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(keep, jnp.exp(logits - m_safe[..., None]), 0.0)
    alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe)
    acc = alpha[..., None] * acc + jnp.einsum("btkgs,bskd->btkgd", p, v_b.astype(jnp.float32))
    return m_new, alpha * l + jnp.sum(p, axis=-1), acc

  def own(carry, kv):
    return update(carry, q5, seg, rows, *kv)

  def earlier(carry, kv):  # every query, the first key half
    k_b, v_b, seg_b, rows_b = kv
    return update(carry, q5, seg, rows, k_b[:, :h], v_b[:, :h], seg_b[:, :h], rows_b[:h])

  def later(carry, kv):  # the second query half, every key
    late = update(tuple(x[:, h:] for x in carry), q5[:, h:], seg[:, h:], rows[h:], *kv)
    return tuple(x.at[:, h:].set(y) for x, y in zip(carry, late))

  def step(i, state):
    carry, kv, work = state
    case = _case(rows, kv[3])
    carry = jax.lax.switch(case, (own, earlier, later), carry, kv)
    work = work + jnp.asarray(HALF_PAIRS)[case]
    kv = jax.lax.cond(i < n - 1, lambda x: jax.lax.ppermute(x, axis_name, perm), lambda x: x, kv)
    return carry, kv, work

  (m, l, acc), _, work = jax.lax.fori_loop(0, n, step, ((m, l, acc), (k, v, seg, rows),
                                                        jnp.zeros((), jnp.int32)))
  o = acc / jnp.where(l == 0, 1.0, l)[..., None]
  lse = jnp.where(l == 0, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l))
  return ungroup_queries(o).astype(q.dtype), lse, work


def _ring_backward(q, k, v, seg, rows, o, lse, do, axis_name, scale):
  n = jax.lax.psum(1, axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]
  hkv = k.shape[2]
  q5 = group_queries(q, hkv).astype(jnp.float32)
  do5 = group_queries(do, hkv).astype(jnp.float32)
  delta = jnp.sum(do5 * group_queries(o, hkv).astype(jnp.float32), axis=-1)

  h = q.shape[1] // 2

  def grads(q5_, do5_, lse_, delta_, seg_q, rows_q, k_b, v_b, seg_b, rows_b):
    """(dq of these queries, dk and dv of these keys) for one block pair."""
    logits, keep = _block(q5_, k_b.astype(jnp.float32), seg_q, seg_b, rows_q, rows_b, scale)
    p = jnp.where(keep, jnp.exp(logits - lse_[..., None]), 0.0)
    dv = jnp.einsum("btkgs,btkgd->bskd", p, do5_)
    dp = jnp.einsum("btkgd,bskd->btkgs", do5_, v_b.astype(jnp.float32))
    ds = p * (dp - delta_[..., None])
    dq = jnp.einsum("btkgs,bskd->btkgd", ds, k_b.astype(jnp.float32)) * scale
    dk = jnp.einsum("btkgs,btkgd->bskd", ds, q5_) * scale
    return dq, dk, dv

  def own(dq, blk):
    k_b, v_b, seg_b, rows_b, dk_b, dv_b = blk
    g_q, g_k, g_v = grads(q5, do5, lse, delta, seg, rows, k_b, v_b, seg_b, rows_b)
    return dq + g_q, (k_b, v_b, seg_b, rows_b, dk_b + g_k, dv_b + g_v)

  def earlier(dq, blk):  # every query, the first key half
    k_b, v_b, seg_b, rows_b, dk_b, dv_b = blk
    g_q, g_k, g_v = grads(q5, do5, lse, delta, seg, rows, k_b[:, :h], v_b[:, :h],
                          seg_b[:, :h], rows_b[:h])
    return dq + g_q, (k_b, v_b, seg_b, rows_b, dk_b.at[:, :h].add(g_k), dv_b.at[:, :h].add(g_v))

  def later(dq, blk):  # the second query half, every key
    k_b, v_b, seg_b, rows_b, dk_b, dv_b = blk
    g_q, g_k, g_v = grads(q5[:, h:], do5[:, h:], lse[:, h:], delta[:, h:], seg[:, h:], rows[h:],
                          k_b, v_b, seg_b, rows_b)
    return dq.at[:, h:].add(g_q), (k_b, v_b, seg_b, rows_b, dk_b + g_k, dv_b + g_v)

  def step(_, state):
    dq, blk = state
    dq, blk = jax.lax.switch(_case(rows, blk[3]), (own, earlier, later), dq, blk)
    return dq, jax.lax.ppermute(blk, axis_name, perm)  # n moves: gradients arrive home

  zeros = jnp.zeros(k.shape, jnp.float32)
  dq, blk = jax.lax.fori_loop(0, n, step, (jnp.zeros_like(q5), (k, v, seg, rows, zeros, zeros)))
  return (ungroup_queries(dq).astype(q.dtype), blk[4].astype(k.dtype), blk[5].astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring(q, k, v, seg, rows, axis_name, scale):
  return _ring_forward(q, k, v, seg, rows, axis_name, scale)[0]


def _ring_fwd(q, k, v, seg, rows, axis_name, scale):
  o, lse, _ = _ring_forward(q, k, v, seg, rows, axis_name, scale)
  return o, (q, k, v, seg, rows, o, lse)


def _ring_bwd(axis_name, scale, res, do):
  q, k, v, seg, rows, o, lse = res
  dq, dk, dv = _ring_backward(q, k, v, seg, rows, o, lse, do, axis_name, scale)
  return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_local(q, k, v, segment_ids, rows, *, axis_name=SEQUENCE_AXIS, sm_scale=None):
  """Inside shard_map: this device's q [B, Tl, Hq, D], k/v [B, Tl, Hkv, D], segment ids
  [B, Tl] and global row indices [Tl] -> its output [B, Tl, Hq, D]."""
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  return _ring(q, k, v, segment_ids, rows, axis_name, scale)


def ring_attention(q, k, v, segment_ids, *, mesh, batch_axes=("data", "fsdp"), sm_scale=None):
  """Causal attention of zigzag-laid-out global arrays q [B, T, Hq, D], k/v [B, T, Hkv, D],
  segment_ids [B, T] (None: one segment), sharded over `mesh`'s sequence axis."""
  n = mesh.shape[SEQUENCE_AXIS]
  t = q.shape[1]
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  spec = P(batch_axes, SEQUENCE_AXIS)

  def local(q, k, v, seg):
    rows = local_rows(t, n, jax.lax.axis_index(SEQUENCE_AXIS))
    return ring_attention_local(q, k, v, seg, rows, sm_scale=sm_scale)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v, segment_ids)
