"""Chunked causal linear attention (with decay) as Pallas Mosaic GPU (Hopper) kernels.

Chunk-parallel, as GPUs need (a sequential scan per (batch, head) would fill 16 SMs of 132):
  1. states: per (batch, head, value slice of 64, scan segment of 32 chunks) a pipeline over
     the segment's chunks writes the state S_c [D, 64] before each chunk and updates
     S <- decay_c S + K_c^T (ks * V_c) on wgmma (K^T straight from shared memory; ks scales the
     value rows); the segments, scanned at once from zero, so neither the scan's latency nor
     the parallelism grows with T, are joined by the carry entering each (an associative scan
     in jnp over the per-segment finals only), which the consumers add in-kernel:
     S_c = local_c + beta_c C_g;
  2. outputs: per (batch, head, chunk), in parallel, num = (QK^T * W) V + qs * (Q S_c) and the
     intra-chunk row sums of QK^T * W (for normalisation), all on wgmma.
Backward (custom_vjp; the states are recomputed, nothing per chunk is kept from the forward):
  3. state gradients: per (batch, head, value slice, scan segment) a pipeline over the chunks
     in reverse writes dH_c (the gradient of the state after chunk c),
     dH <- decay_c dH + Q_c^T (qs * dN_c), segments joined as in 1;
  4. per chunk, in parallel: dq = P K + qs * (dN S_c^T), and in a second kernel
     dk = P^T Q + ks * (V dH_c^T), dv = A^T dN + ks * (K dH_c), with A = (QK^T) * W and
     P = (dN V^T + dR) * W (dR: the cotangent of the row sums); the gate gradient is
     phi(q).dq - phi(k).dk reverse-cumsummed, as in the TPU kernels.
The per-token scalars (b, qs, ks, decay; segment resets folded in) are the TPU kernels' (see
linear/pallas_tpu.py); the normaliser's inter-chunk part qs * (phi(q) . z_c) and the division
are jnp (autodiff carries them). Chunks of 64 or 128 tokens: the backward keeps only operand
tiles in shared memory (its fp32 results go from registers to memory), so 128 fits at head
dim 128.

Status: validated in Mosaic GPU interpret mode on the CPU and by lowering for CUDA
(tests/test_linear_gpu_kernel.py), and on an H200 (tests/test_gpu.py; docs/benchmarks.md:
forward+backward 2.6 ms per 32k tokens, 14x the XLA chunked form), so impl="auto" picks it on
GPUs wherever it takes the call.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import cdiv
from pallas_kernels.linear.pallas_tpu import _chunk_scalars
from pallas_kernels.linear.reference import EPS, apply_feature_map, log_gates

DTYPES = (jnp.bfloat16, jnp.float16)
VALUE_SLICE = 64
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
CHUNK_SIZES = (64, 128)
SCAN_SEGMENT_CHUNKS = 32  # chunks per independent piece of the state scans (see _decayed_sums)


def _transforms(dtype):
  swizzle = 128
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _stage(value, smem):
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()
  return smem


def _product(a, b, shape):
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _row_vector(ref, t0, chunk, layout):
  return plgpu.load(ref.at[pl.ds(t0, chunk)], layout=layout, optimized=False)


def _intra_weights(b_rows_ref, b_cols_ref, seg_rows_ref, seg_cols_ref, t0, chunk):
  """W [C, C] of the chunk starting at t0: exp(b_i - b_j) where j <= i in the same segment,
  else 0 (every exponent kept is <= 0). Each per-token vector comes from its own operand (rows
  and columns are separate refs of the same data): Mosaic GPU's layout inference fails when one
  memory ref is loaded with two layouts."""
  wg = plgpu.Layout.WGMMA
  shape = (chunk, chunk)
  rows = lambda ref: jax.lax.broadcast_in_dim(_row_vector(ref, t0, chunk, wg.reduce(1)), shape,
                                              [0])
  cols = lambda ref: jax.lax.broadcast_in_dim(_row_vector(ref, t0, chunk, wg.reduce(0)), shape,
                                              [1])
  row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wg)
  col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wg)
  keep = (col <= row) & (rows(seg_rows_ref) == cols(seg_cols_ref))
  diff = rows(b_rows_ref) - cols(b_cols_ref)
  return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


def _decayed_sums_local(x, y, scale, decay, *, chunk, reverse, per, interpret):
  """The scan of _decayed_sums restarted from H = 0 every `per` chunks (in processing order):
  (local [B, Hq, n * D, Dv] in the input dtype, the value before each chunk within its scan
  segment; finals [B, Hq, n_seg * D, Dv] fp32, each segment's value after its last chunk).
  One pipeline per (scan segment, value slice of 64, query head, batch)."""
  b, tp, _, d = x.shape
  hq = scale.shape[1]
  dv = y.shape[-1]
  n = tp // chunk
  n_seg = cdiv(n, per)
  bv = min(VALUE_SLICE, dv)
  n_v = dv // bv
  x_group, y_group = hq // x.shape[2], hq // y.shape[2]
  wg = plgpu.Layout.WGMMA
  dtype = x.dtype
  tr = _transforms(dtype)

  def kernel(x_gmem, y_gmem, scale_gmem, decay_gmem, out_gmem, final_gmem, stage_smem, out_smem):
    sv, h, bi = (jax.lax.axis_index(a) for a in ("sv", "h", "b"))
    g, vi = sv // n_v, sv % n_v
    chunk_at = (lambda j: n - 1 - (g * per + j)) if reverse else (lambda j: g * per + j)

    def body(idx, x_smem, y_smem, acc):
      c = chunk_at(idx[0])
      # Outputs go out by hand, not by pipeline out_specs: Mosaic GPU interpret mode has no
      # predicated stores.
      plgpu.wait_smem_to_gmem(0)  # the previous chunk's copy has left out_smem
      out_smem[...] = acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem,
                              out_gmem.at[bi, h, pl.ds(c * d, d), pl.ds(vi * bv, bv)])
      scale_rows = plgpu.load(scale_gmem.at[bi, h, pl.ds(c * chunk, chunk)],
                              layout=wg.reduce(1), optimized=False)
      y_rows = plgpu.load(y_smem, layout=wg, optimized=False).astype(jnp.float32)
      scaled = y_rows * jax.lax.broadcast_in_dim(scale_rows, (chunk, bv), [0])
      update = _product(x_smem.T, _stage(scaled, stage_smem), (d, bv))
      decay_rows = plgpu.load(decay_gmem.at[bi, h, c], layout=wg.reduce(1), optimized=False)
      return jax.lax.broadcast_in_dim(decay_rows, (d, bv), [0]) * acc + update

    x_spec = plgpu.BlockSpec((chunk, d), lambda j: (chunk_at(j), 0), transforms=tr)
    y_spec = plgpu.BlockSpec((chunk, bv), lambda j: (chunk_at(j), vi), transforms=tr)
    final = plgpu.emit_pipeline(
        body, grid=(jnp.minimum(per, n - g * per),), in_specs=[x_spec, y_spec],
        max_concurrent_steps=2,
        init_carry=plgpu.layout_cast(jnp.zeros((d, bv), jnp.float32), wg))(
            x_gmem.at[bi, :, h // x_group], y_gmem.at[bi, :, h // y_group])
    final_gmem.at[bi, h, pl.ds(g * d, d), pl.ds(vi * bv, bv)][...] = final
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=(jax.ShapeDtypeStruct((b, hq, n * d, dv), dtype),
                        jax.ShapeDtypeStruct((b, hq, n_seg * d, dv), jnp.float32)),
      grid=(n_seg * n_v, hq, b), grid_names=("sv", "h", "b"),
      scratch_types=(plgpu.SMEM((chunk, bv), dtype, transforms=tr),
                     plgpu.SMEM((d, bv), dtype, transforms=tr)),
      interpret=interpret or False)(x, y, scale, decay)


def _decayed_sums(x, y, scale, decay, *, chunk, reverse, interpret):
  """For each chunk c (in time order, or in reverse), the value H had before c was folded in,
  with H <- decay_c H + X_c^T (scale_c * Y_c) and H = 0 at the start. Forward: X = phi(K),
  Y = V, scale = ks gives the states S_c; reverse: X = phi(Q), Y = dN, scale = qs gives dH_c,
  the gradient of the state after chunk c. x, y may have fewer (key/value) heads than scale
  [B, Hq, Tp]; decay is [B, Hq, n, D] (one value per chunk, broadcast over D).

  A scan is sequential, so its time is steps x the latency of one; to keep that (and the
  parallelism) independent of T, the kernel restarts it every SCAN_SEGMENT_CHUNKS (`per`)
  chunks, all segments at once. Returns (local, carry): local [B, Hq, n * D, Dv] in the input
  dtype (fp32 accumulation), the value before chunk c within its segment; carry None when one
  segment holds every chunk, else (entering [B, Hq, n_seg * D, Dv] in the input dtype, the value
  entering each segment: C_0 = 0, C_{g+1} = (prod of g's decays) C_g + final_g, joined here
  by an associative scan over the small per-segment finals; beta [B, Hq, n] fp32, the product
  of the decays from the start of c's segment to c). The value before chunk c is
  local_c + beta_c C_{seg(c)} (see _segment_of); the consuming kernels add the second term
  themselves (one more small matmul against a tile their segment shares), so the per-chunk
  values are written once and never rewritten."""
  b, tp, _, d = x.shape
  hq, dv = scale.shape[1], y.shape[-1]
  n = tp // chunk
  per = SCAN_SEGMENT_CHUNKS
  local, finals = _decayed_sums_local(x, y, scale, decay, chunk=chunk, reverse=reverse,
                                      per=per, interpret=interpret)
  n_seg = cdiv(n, per)
  if n_seg == 1:
    return local, None
  order = (lambda a: jnp.flip(a, axis=2)) if reverse else (lambda a: a)  # processing order
  dec = jnp.pad(order(decay[..., 0]), ((0, 0), (0, 0), (0, n_seg * per - n)),
                constant_values=1.0).reshape(b, hq, n_seg, per)
  before = jnp.cumprod(jnp.pad(dec[..., :-1], ((0, 0),) * 3 + ((1, 0),), constant_values=1.0),
                       axis=-1)  # [B, Hq, n_seg, per]: decay from the segment start to p
  finals = finals.reshape(b, hq, n_seg, d, dv)

  def then(x, y):  # segment maps C -> a C + f, composed: x, then y
    return x[0] * y[0], y[0][..., None, None] * x[1] + y[1]

  # An associative scan (log2(n_seg) fused steps), not a sequential one: on a GPU each step of
  # a scan is a kernel launch, n_seg of them per scan.
  _, after = jax.lax.associative_scan(then, (jnp.prod(dec, axis=-1), finals), axis=2)
  entering = jnp.pad(after[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))  # C_0 = 0
  entering = entering.reshape(b, hq, n_seg * d, dv).astype(local.dtype)
  beta = order(before.reshape(b, hq, n_seg * per)[:, :, :n])  # back to time order
  return local, (entering, beta)


def _segment_of(c, n, reverse):
  """The scan segment holding chunk c (see _decayed_sums)."""
  return (n - 1 - c) // SCAN_SEGMENT_CHUNKS if reverse else c // SCAN_SEGMENT_CHUNKS


def _carry_scale(scale, carry, chunk):
  """Per token [B, Hq, Tp]: scale times beta of the token's chunk (the carry term's row
  factor), or None without carries."""
  if carry is None:
    return None
  return scale * jnp.repeat(carry[1], chunk, axis=-1)


def _outputs(fq, fk, v, states, bcum, qs, seg, carry, *, chunk, interpret, num_dtype,
             stage=None):
  """num [B, Tp, Hq, Dv] in num_dtype (fp32 when a normalisation follows, else the output's
  dtype: no fp32 round trip) and the intra-chunk row sums of QK^T * W [B, Hq, Tp]. states and
  carry as _decayed_sums returns them. Each CTA pipelines a few consecutive chunks of one scan
  segment (their tiles and states stream in while it computes; the segment's carry tile is
  loaded once)."""
  b, tp, hq, d = fq.shape
  dv = v.shape[-1]
  n = tp // chunk
  per_cta = next(m for m in (4, 2, 1) if n % m == 0 and SCAN_SEGMENT_CHUNKS % m == 0)
  group = hq // fk.shape[2]
  wg = plgpu.Layout.WGMMA
  dtype = fq.dtype
  tr = _transforms(dtype)
  stage = bool(interpret) if stage is None else stage  # interpret mode: wgmma reads SMEM only
  shape = (chunk, chunk)
  # Double-buffer the tiles when they fit (chunk 128 with head dim 128 does not); the slack
  # covers Mosaic GPU's reduction scratch (2 KiB), barriers and 1 KiB alignment.
  item = jnp.dtype(dtype).itemsize
  per_step = chunk * (2 * d + dv) * item + d * dv * item
  fixed = (chunk * chunk * item if stage else 0) + (d * dv * item if carry else 0) + 4096
  steps_in_flight = 2 if 2 * per_step + fixed <= SMEM_BYTES else 1
  carry_in = () if carry is None else (carry[0], _carry_scale(qs, carry, chunk))

  def kernel(q_gmem, k_gmem, v_gmem, s_gmem, b_gmem, b2_gmem, qs_gmem, seg_gmem, seg2_gmem,
             *rest):
    c_gmem = qsb_gmem = c_smem = None
    if carry:
      c_gmem, qsb_gmem, *rest = rest
    num_gmem, rows_gmem, *rest = rest
    if carry:
      c_smem, barrier, *rest = rest
    a_smem = rest[0] if stage else None
    o, h, bi = (jax.lax.axis_index(x) for x in ("o", "h", "b"))
    kvh = h // group
    if carry:  # every chunk of this CTA is in one scan segment
      plgpu.copy_gmem_to_smem(
          c_gmem.at[bi, h, pl.ds(_segment_of(o * per_cta, n, False) * d, d)], c_smem, barrier)
      plgpu.barrier_wait(barrier)

    def body(idx, q_smem, k_smem, v_smem, s_smem):
      t0 = (o * per_cta + idx[0]) * chunk
      w = _intra_weights(b_gmem.at[bi, h], b2_gmem.at[bi, h], seg_gmem.at[bi], seg2_gmem.at[bi],
                         t0, chunk)
      a = _product(q_smem, k_smem.T, shape) * w
      a_lhs = _stage(a, a_smem) if stage else a.astype(dtype)
      intra = _product(a_lhs, v_smem, (chunk, dv))
      rows = lambda ref: jax.lax.broadcast_in_dim(_row_vector(ref, t0, chunk, wg.reduce(1)),
                                                  (chunk, dv), [0])
      num = intra + rows(qs_gmem.at[bi, h]) * _product(q_smem, s_smem, (chunk, dv))
      if carry:
        num = num + rows(qsb_gmem.at[bi, h]) * _product(q_smem, c_smem, (chunk, dv))
      # Straight from registers to memory (as the backward's results): no staging buffer, so
      # the tiles stay double-buffered with the carry tile at chunk 64 and head dim 128.
      num_gmem.at[bi, pl.ds(t0, chunk), h][...] = num.astype(num_dtype)
      rows_gmem.at[bi, h, pl.ds(t0, chunk)][...] = a.sum(axis=1)

    first = o * per_cta
    tile = lambda width: plgpu.BlockSpec((chunk, width), lambda c: (first + c, 0),
                                         transforms=tr)
    state = plgpu.BlockSpec((d, dv), lambda c: (first + c, 0), transforms=tr)
    plgpu.emit_pipeline(
        body, grid=(per_cta,), in_specs=[tile(d), tile(d), tile(dv), state],
        max_concurrent_steps=steps_in_flight)(
            q_gmem.at[bi, :, h], k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh], s_gmem.at[bi, h])

  scratch = ((plgpu.SMEM((d, dv), dtype, transforms=tr), plgpu.Barrier()) if carry else ())
  if stage:
    scratch += (plgpu.SMEM((chunk, chunk), dtype, transforms=tr),)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, tp, hq, dv), num_dtype),
                jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
      grid=(n // per_cta, hq, b), grid_names=("o", "h", "b"), scratch_types=scratch,
      interpret=interpret or False)(fq, fk, v, states, bcum, bcum, qs, seg, seg, *carry_in)


def _chunk_grads(fq, fk, v, dn, drows, states, dstates, bcum, qs, ks, seg, carry, *, chunk,
                 interpret, which):
  """Per chunk, in parallel, with P = (dN V^T + dR 1^T) * W and A = (Q K^T) * W:
    which="dq":  dq = P K + qs * (dN S_c^T)                           -> (dq, phi(q).dq)
    which="dkv": dk = P^T Q + ks * (V dH_c^T),  dv = A^T dN + ks * (K dH_c) -> (dk, dv, phi(k).dk)
  dq, dk, dv [B, Tp, Hq, D] in the input dtype (dk, dv per query head; the caller sums each
  group); the row dots [B, Hq, Tp] fp32, taken from the fp32 accumulators, are what the gate
  gradient needs, so no fp32 gradient ever goes to memory. S_c (dH_c) is the segment-local
  value plus beta_c times its segment's carry (the carry of the states for dq, of the state
  gradients for dk/dv; see _decayed_sums), the second term one more matmul. Shared memory holds
  only the operand tiles (6, and the carry; A reuses P's buffer once dk is done) and the
  results go from registers straight to memory, so chunk 128 fits at head dim 128."""
  b, tp, hq, d = fq.shape
  dv = v.shape[-1]
  n = tp // chunk
  group = hq // fk.shape[2]
  wg = plgpu.Layout.WGMMA
  dtype = fq.dtype
  tr = _transforms(dtype)
  shape = (chunk, chunk)

  reverse = which == "dkv"  # dH comes from the reverse scan

  def kernel(q_gmem, k_gmem, v_gmem, dn_gmem, dr_gmem, s_gmem, b_gmem, b2_gmem, qs_gmem, ks_gmem,
             seg_gmem, seg2_gmem, *rest):
    c_gmem = cs_gmem = c_smem = None
    if carry:
      c_gmem, cs_gmem, *rest = rest
    if which == "dq":
      dq_gmem, dot_gmem, *rest = rest
    else:
      dk_gmem, dv_gmem, dot_gmem, *rest = rest
    q_smem, k_smem, v_smem, dn_smem, s_smem, p_smem, barrier, *rest = rest
    if carry:
      (c_smem,) = rest
    c, h, bi = (jax.lax.axis_index(x) for x in ("c", "h", "b"))
    kvh = h // group
    t0 = c * chunk
    copies = [(q_gmem.at[bi, pl.ds(t0, chunk), h], q_smem),
              (k_gmem.at[bi, pl.ds(t0, chunk), kvh], k_smem),
              (v_gmem.at[bi, pl.ds(t0, chunk), kvh], v_smem),
              (dn_gmem.at[bi, pl.ds(t0, chunk), h], dn_smem),
              (s_gmem.at[bi, h, pl.ds(c * d, d)], s_smem)]
    if carry:
      copies.append((c_gmem.at[bi, h, pl.ds(_segment_of(c, n, reverse) * d, d)], c_smem))
    for src, dst in copies:
      plgpu.copy_gmem_to_smem(src, dst, barrier)
      plgpu.barrier_wait(barrier)
    vec = lambda ref: _row_vector(ref, t0, chunk, wg.reduce(1))
    by_rows = lambda ref, width: jax.lax.broadcast_in_dim(vec(ref.at[bi, h]), (chunk, width),
                                                          [0])

    def state_term(lhs_smem, transpose, width):
      """scale * (lhs S_c^T) (transpose) or scale * (lhs S_c): the local part, plus the
      carry's with its beta-scaled rows."""
      rhs = lambda ref: ref.T if transpose else ref
      term = by_rows(qs_gmem if which == "dq" else ks_gmem, width) * _product(
          lhs_smem, rhs(s_smem), (chunk, width))
      if carry:
        term = term + by_rows(cs_gmem, width) * _product(lhs_smem, rhs(c_smem), (chunk, width))
      return term
    w = _intra_weights(b_gmem.at[bi, h], b2_gmem.at[bi, h], seg_gmem.at[bi], seg2_gmem.at[bi],
                       t0, chunk)
    dr = jax.lax.broadcast_in_dim(vec(dr_gmem.at[bi, h]), shape, [0])
    p = (_product(dn_smem, v_smem.T, shape) + dr) * w
    _stage(p, p_smem)

    def out(grad, ref, features_smem):
      """grad [chunk, D] fp32 -> ref (input dtype), and its row dots with the features."""
      ref.at[bi, pl.ds(t0, chunk), h][...] = grad.astype(dtype)
      if features_smem is not None:
        features = plgpu.load(features_smem, layout=wg, optimized=False)
        dot_gmem.at[bi, h, pl.ds(t0, chunk)][...] = (grad * features.astype(jnp.float32)).sum(
            axis=1)

    if which == "dq":
      out(_product(p_smem, k_smem, (chunk, d)) + state_term(dn_smem, True, d), dq_gmem, q_smem)
      return
    out(_product(p_smem.T, q_smem, (chunk, d)) + state_term(v_smem, True, d), dk_gmem, k_smem)
    a = _product(q_smem, k_smem.T, shape) * w  # P's products have finished: reuse its buffer
    _stage(a, p_smem)
    out(_product(p_smem.T, dn_smem, (chunk, dv)) + state_term(k_smem, False, dv), dv_gmem, None)

  tile = lambda rows, cols: plgpu.SMEM((rows, cols), dtype, transforms=tr)
  scratch = (tile(chunk, d), tile(chunk, d), tile(chunk, dv), tile(chunk, dv), tile(d, dv),
             tile(chunk, chunk), plgpu.Barrier()) + ((tile(d, dv),) if carry else ())
  carry_in = () if carry is None else (carry[0], _carry_scale(qs if which == "dq" else ks,
                                                              carry, chunk))
  grad = lambda width: jax.ShapeDtypeStruct((b, tp, hq, width), dtype)
  dots = jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)
  if which == "dq":
    out_type, state_like = (grad(d), dots), states
  else:
    out_type, state_like = (grad(d), grad(dv), dots), dstates
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(n, hq, b), grid_names=("c", "h", "b"),
      scratch_types=scratch, interpret=interpret or False)(
          fq, fk, v, dn, drows, state_like, bcum, bcum, qs, ks, seg, seg, *carry_in)


def _scalars(g, seg, chunk, d):
  bcum, qs, ks, seg_p = _chunk_scalars(g, seg, chunk)  # [B, H, Tp] each, seg [B, Tp]
  b, hq, tp = qs.shape
  n = tp // chunk
  decay = jnp.broadcast_to(qs.reshape(b, hq, n, chunk)[..., -1:], (b, hq, n, d))
  return bcum, qs, ks, seg_p, decay


def _pad_time(x, tp):
  return jnp.pad(x, ((0, 0), (0, tp - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _kernel_part(fq, fk, v, g, seg, chunk, interpret, normalize):
  """(num [B, T, Hq, Dv], intra-chunk row sums [B, Hq, T] fp32): the pair sums
  sum_j G(t, j) (phi(q_t).phi(k_j)) v_j over all j <= t, and over j in t's chunk without v.
  num is fp32 when normalize (the division follows), else in the input dtype."""
  return _kernel_part_fwd(fq, fk, v, g, seg, chunk, interpret, normalize)[0]


def _kernel_part_fwd(fq, fk, v, g, seg, chunk, interpret, normalize):
  t, d = fq.shape[1], fq.shape[-1]
  bcum, qs, ks, seg_p, decay = _scalars(g, seg, chunk, d)
  tp = qs.shape[-1]
  fq_p, fk_p, v_p = (_pad_time(x, tp) for x in (fq, fk, v))
  states, carry = _decayed_sums(fk_p, v_p, ks, decay, chunk=chunk, reverse=False,
                                interpret=interpret)
  num, rows = _outputs(fq_p, fk_p, v_p, states, bcum, qs, seg_p, carry, chunk=chunk,
                       interpret=interpret, num_dtype=jnp.float32 if normalize else fq.dtype)
  return (num[:, :t], rows[:, :, :t]), (fq_p, fk_p, v_p, g, seg, t)


def _kernel_part_bwd(chunk, interpret, normalize, res, cotangents):
  """Recomputes the chunk states (the forward saves nothing per chunk), then the state
  gradients in reverse and the per-chunk gradients."""
  fq_p, fk_p, v_p, g, seg, t = res
  dnum, drows = cotangents
  b, tp, hq, d = fq_p.shape
  hkv = fk_p.shape[2]
  group = hq // hkv
  bcum, qs, ks, seg_p, decay = _scalars(g, seg, chunk, d)
  states, carry = _decayed_sums(fk_p, v_p, ks, decay, chunk=chunk, reverse=False,
                                interpret=interpret)
  dn = _pad_time(dnum, tp).astype(fq_p.dtype)  # a tensor-core operand
  dr = jnp.pad(drows.astype(jnp.float32), ((0, 0), (0, 0), (0, tp - t)))
  dstates, dcarry = _decayed_sums(fq_p, dn, qs, decay, chunk=chunk, reverse=True,
                                  interpret=interpret)
  args = (fq_p, fk_p, v_p, dn, dr, states, dstates, bcum, qs, ks, seg_p)
  kw = dict(chunk=chunk, interpret=interpret)
  dq, q_dots = _chunk_grads(*args, carry, which="dq", **kw)
  dk, dv, k_dots = _chunk_grads(*args, dcarry, which="dkv", **kw)
  # dL/dc_t = phi(q_t).dq_t - phi(k_t).dk_t per query head (see linear/pallas_tpu.py).
  dc = (q_dots - k_dots).transpose(0, 2, 1)  # [B, Tp, Hq]
  dg = jnp.cumsum(dc[:, ::-1], axis=1)[:, ::-1][:, :t]
  fold = lambda x: x.astype(jnp.float32).reshape(b, tp, hkv, group, -1).sum(axis=3)[:, :t]
  return (dq[:, :t], fold(dk).astype(fk_p.dtype), fold(dv).astype(v_p.dtype), dg, None)


_kernel_part.defvjp(_kernel_part_fwd, _kernel_part_bwd)


def _normaliser_inter(fq, fk, g, seg, chunk):
  """qs_t * (phi(q_t) . z_c): the normaliser's part from before t's chunk, in jnp (z_c, the
  decayed key sum before chunk c, by an associative scan over chunks). [B, Hq, T]."""
  b, t, hq, d = fq.shape
  hkv = fk.shape[2]
  _, qs, ks, _, decay = _scalars(g, seg, chunk, d)
  tp = qs.shape[-1]
  n = tp // chunk
  f32 = lambda x: _pad_time(x, tp).astype(jnp.float32)
  # Per chunk, grouped by key/value head: neither the keys nor z are repeated per query head
  # or per token in memory.
  dz = jnp.einsum("bkgnc,bnckd->bkgnd", ks.reshape(b, hkv, hq // hkv, n, chunk),
                  f32(fk).reshape(b, n, chunk, hkv, d)).reshape(b, hq, n, d)

  def combine(x, y):
    return x[0] * y[0], y[0] * x[1] + y[1]

  _, z_after = jax.lax.associative_scan(combine, (decay[..., :1], dz), axis=2)
  z_before = jnp.pad(z_after, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :n]
  dots = jnp.einsum("bnchd,bhnd->bhnc", f32(fq).reshape(b, n, chunk, hq, d), z_before)
  return (dots.reshape(b, hq, tp) * qs)[:, :, :t]


def _linear_gpu(fq, fk, v, g, seg, chunk, normalize, interpret):
  num, rows = _kernel_part(fq, fk, v, g, seg, chunk, interpret, normalize)
  if not normalize:
    return num
  den = rows + _normaliser_inter(fq, fk, g, seg, chunk)
  return num / (den.transpose(0, 2, 1)[..., None] + EPS)


def linear_attention_gpu(q, k, v, *, feature_map="elu1", decay=None, normalize=True,
                         chunk_size=64, segment_ids=None, interpret=None):
  """The Mosaic GPU kernels, forward and backward. bf16/fp16 inputs (fp32 inputs run with bf16
  operands), head dims 64 or 128, chunk 64 or 128. interpret=plgpu.InterpretGPUParams() runs them on
  the CPU."""
  if chunk_size not in CHUNK_SIZES:
    raise ValueError(f"linear_attention: the Mosaic GPU kernel takes chunk_size 64 or 128; got "
                     f"{chunk_size}")
  if q.shape[-1] not in (64, 128) or v.shape[-1] not in (64, 128):
    raise ValueError(f"linear_attention: the Mosaic GPU kernel takes head dims 64 or 128; got "
                     f"{q.shape[-1]} and {v.shape[-1]}")
  out_dtype = q.dtype
  if q.dtype == jnp.float32:
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  if q.dtype not in DTYPES:
    raise ValueError(f"linear_attention: the Mosaic GPU kernel takes bfloat16/float16/float32; "
                     f"got {q.dtype}")
  fq = apply_feature_map(q.astype(jnp.float32), feature_map).astype(q.dtype)
  fk = apply_feature_map(k.astype(jnp.float32), feature_map).astype(k.dtype)
  g = log_gates(decay, q)
  b, t = q.shape[:2]
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  out = _linear_gpu(fq, fk, v, g, seg, chunk_size, normalize, interpret)
  return out.astype(out_dtype)
