"""Chunked causal linear attention (with decay) as Pallas Mosaic GPU (Hopper) kernels: forward.

Chunk-parallel, as GPUs need (a sequential scan per (batch, head) would fill 16 SMs of 132):
  1. states: per (batch, head, value slice of 64) a pipeline over the chunks writes the state
     S_c [D, 64] before each chunk and updates S <- decay_c S + K_c^T (ks * V_c) on wgmma
     (K^T straight from shared memory; ks scales the value rows);
  2. outputs: per (batch, head, chunk), in parallel, num = (QK^T * W) V + qs * (Q S_c) and the
     intra-chunk row sums of QK^T * W (for normalisation), all on wgmma.
The per-token scalars (b, qs, ks, decay; segment resets folded in) are the TPU kernels' (see
linear/pallas_tpu.py); the normaliser's inter-chunk part qs * (phi(q) . z_c) and the division
are jnp. The backward is jax's autodiff of the chunked jnp form (linear_chunked) for now: the
Mosaic GPU backward kernels are still to come.

Status: validated in Mosaic GPU interpret mode on the CPU and by lowering for CUDA
(tests/test_linear_gpu_kernel.py); not yet run on a GPU and not registered as impl="pallas".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import cdiv
from pallas_kernels.linear.pallas_tpu import _chunk_scalars
from pallas_kernels.linear.reference import EPS, apply_feature_map, linear_chunked, log_gates

DTYPES = (jnp.bfloat16, jnp.float16)
VALUE_SLICE = 64
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block


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


def _states(fk, v, ks, decay, *, chunk, interpret):
  """S_c as [B, H, n * D, Dv]: the state before each chunk, accumulated in fp32 and stored in the
  input dtype (it is a tensor-core operand of the output kernel)."""
  b, tp, hkv, d = fk.shape
  hq = ks.shape[1]  # the states are per query head (the gates are)
  dv = v.shape[-1]
  n = tp // chunk
  bv = min(VALUE_SLICE, dv)
  group = hq // hkv
  wg = plgpu.Layout.WGMMA
  dtype = fk.dtype
  tr = _transforms(dtype)

  def kernel(k_gmem, v_gmem, ks_gmem, decay_gmem, s_gmem, stage_smem, s_out):
    vi, h, bi = (jax.lax.axis_index(x) for x in ("v", "h", "b"))
    kvh = h // group

    def body(idx, k_smem, v_smem, state):
      c = idx[0]
      # The state goes out by TMA from s_out (outputs are written by hand, not by pipeline
      # out_specs: Mosaic GPU interpret mode has no predicated stores).
      plgpu.wait_smem_to_gmem(0)  # the previous chunk's copy has left s_out
      s_out[...] = state.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s_out, s_gmem.at[bi, h, pl.ds(c * d, d), pl.ds(vi * bv, bv)])
      ks_rows = plgpu.load(ks_gmem.at[bi, h, pl.ds(c * chunk, chunk)], layout=wg.reduce(1),
                           optimized=False)
      v_rows = plgpu.load(v_smem, layout=wg, optimized=False).astype(jnp.float32)
      scaled = v_rows * jax.lax.broadcast_in_dim(ks_rows, (chunk, bv), [0])
      update = _product(k_smem.T, _stage(scaled, stage_smem), (d, bv))
      decay_rows = plgpu.load(decay_gmem.at[bi, h, c], layout=wg.reduce(1), optimized=False)
      return jax.lax.broadcast_in_dim(decay_rows, (d, bv), [0]) * state + update

    k_spec = plgpu.BlockSpec((chunk, d), lambda c: (c, 0), transforms=tr)
    v_spec = plgpu.BlockSpec((chunk, bv), lambda c: (c, vi), transforms=tr)
    plgpu.emit_pipeline(
        body, grid=(n,), in_specs=[k_spec, v_spec], max_concurrent_steps=2,
        init_carry=plgpu.layout_cast(jnp.zeros((d, bv), jnp.float32), wg))(
            k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((b, hq, n * d, dv), dtype),
      grid=(dv // bv, hq, b), grid_names=("v", "h", "b"),
      scratch_types=(plgpu.SMEM((chunk, bv), dtype, transforms=tr),
                     plgpu.SMEM((d, bv), dtype, transforms=tr)),
      interpret=interpret or False)(fk, v, ks, decay)


def _outputs(fq, fk, v, states, bcum, qs, seg, *, chunk, interpret, stage=None):
  """num [B, Tp, Hq, Dv] (fp32) and the intra-chunk row sums of QK^T * W [B, Hq, Tp]. Each CTA
  pipelines a few consecutive chunks (their tiles and states stream in while it computes)."""
  b, tp, hq, d = fq.shape
  dv = v.shape[-1]
  n = tp // chunk
  per_cta = next(m for m in (4, 2, 1) if n % m == 0)
  group = hq // fk.shape[2]
  wg = plgpu.Layout.WGMMA
  dtype = fq.dtype
  tr = _transforms(dtype)
  stage = bool(interpret) if stage is None else stage  # interpret mode: wgmma reads SMEM only
  shape = (chunk, chunk)
  # Double-buffer the tiles when they fit (chunk 128 with head dim 128 does not).
  item = jnp.dtype(dtype).itemsize
  per_step = chunk * (2 * d + dv) * item + d * dv * item
  fixed = chunk * dv * 4 + chunk * 4 + (chunk * chunk * item if stage else 0)
  steps_in_flight = 2 if 2 * per_step + fixed <= SMEM_BYTES else 1

  def kernel(q_gmem, k_gmem, v_gmem, s_gmem, b_gmem, b2_gmem, qs_gmem, seg_gmem, seg2_gmem,
             num_gmem, rows_gmem, num_smem, rows_smem, a_smem=None):
    o, h, bi = (jax.lax.axis_index(x) for x in ("o", "h", "b"))
    kvh = h // group

    def body(idx, q_smem, k_smem, v_smem, s_smem):
      t0 = (o * per_cta + idx[0]) * chunk
      vec = lambda ref, layout: plgpu.load(ref.at[pl.ds(t0, chunk)], layout=layout,
                                           optimized=False)
      b_tok, seg_tok = b_gmem.at[bi, h], seg_gmem.at[bi]
      b_tok2, seg_tok2 = b2_gmem.at[bi, h], seg2_gmem.at[bi]
      rows2 = lambda x: jax.lax.broadcast_in_dim(x, shape, [0])
      cols2 = lambda x: jax.lax.broadcast_in_dim(x, shape, [1])
      row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wg)
      col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wg)
      keep = (col <= row) & (rows2(vec(seg_tok, wg.reduce(1))) == cols2(vec(seg_tok2, wg.reduce(0))))
      diff = rows2(vec(b_tok, wg.reduce(1))) - cols2(vec(b_tok2, wg.reduce(0)))
      w = jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)
      a = _product(q_smem, k_smem.T, shape) * w
      a_lhs = _stage(a, a_smem) if stage else a.astype(dtype)
      intra = _product(a_lhs, v_smem, (chunk, dv))
      inter = _product(q_smem, s_smem, (chunk, dv))
      qs_rows = vec(qs_gmem.at[bi, h], wg.reduce(1))
      plgpu.wait_smem_to_gmem(0)  # the previous chunk's outputs have left (see _states)
      num_smem[...] = intra + jax.lax.broadcast_in_dim(qs_rows, (chunk, dv), [0]) * inter
      rows_smem[...] = a.sum(axis=1)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(num_smem, num_gmem.at[bi, pl.ds(t0, chunk), h])
      plgpu.copy_smem_to_gmem(rows_smem, rows_gmem.at[bi, h, pl.ds(t0, chunk)])

    first = o * per_cta
    tile = lambda width: plgpu.BlockSpec((chunk, width), lambda c: (first + c, 0),
                                         transforms=tr)
    state = plgpu.BlockSpec((d, dv), lambda c: (first + c, 0), transforms=tr)
    plgpu.emit_pipeline(
        body, grid=(per_cta,), in_specs=[tile(d), tile(d), tile(dv), state],
        max_concurrent_steps=steps_in_flight)(
            q_gmem.at[bi, :, h], k_gmem.at[bi, :, kvh], v_gmem.at[bi, :, kvh], s_gmem.at[bi, h])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, tp, hq, dv), jnp.float32),
                jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
      grid=(n // per_cta, hq, b), grid_names=("o", "h", "b"),
      scratch_types=(plgpu.SMEM((chunk, dv), jnp.float32), plgpu.SMEM((chunk,), jnp.float32))
      + ((plgpu.SMEM((chunk, chunk), dtype, transforms=tr),) if stage else ()),
      interpret=interpret or False)(fq, fk, v, states, bcum, bcum, qs, seg, seg)


def _forward(fq, fk, v, g, seg, *, chunk, normalize, interpret):
  b, t, hq, d = fq.shape
  n = cdiv(t, chunk)
  tp = n * chunk
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  bcum, qs, ks, seg_p = _chunk_scalars(g, seg, chunk)  # [B, H, Tp] each, seg [B, Tp]
  decay = jnp.broadcast_to(qs.reshape(b, hq, n, chunk)[..., -1:], (b, hq, n, d))
  fq_p, fk_p, v_p = pad(fq), pad(fk), pad(v)
  states = _states(fk_p, v_p, ks, decay, chunk=chunk, interpret=interpret)
  num, intra_rows = _outputs(fq_p, fk_p, v_p, states, bcum, qs, seg_p, chunk=chunk,
                             interpret=interpret)
  num = num[:, :t]
  if not normalize:
    return num
  # z_c (the key sum before chunk c) by an associative scan over chunks, then
  # den = intra row sums + qs * (phi(q) . z_c).
  hkv = fk.shape[2]
  fk_rep = jnp.repeat(fk_p.astype(jnp.float32), hq // hkv, axis=2)  # [B, Tp, Hq, D]
  dz = jnp.einsum("bhnc,bnchd->bhnd", ks.reshape(b, hq, n, chunk),
                  fk_rep.reshape(b, n, chunk, hq, d))
  a = decay[..., :1]

  def combine(x, y):
    return x[0] * y[0], y[0] * x[1] + y[1]

  _, z_after = jax.lax.associative_scan(combine, (a, dz), axis=2)  # z after chunk c
  z_before = jnp.pad(z_after, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :n]
  z_tok = jnp.repeat(z_before, chunk, axis=2)  # [B, H, Tp, D]
  inter = jnp.einsum("bthd,bhtd->bht", fq_p.astype(jnp.float32), z_tok) * qs
  den = (intra_rows + inter)[:, :, :t].transpose(0, 2, 1)[..., None]
  return num / (den + EPS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _linear_gpu(fq, fk, v, g, seg, chunk, normalize, interpret):
  return _forward(fq, fk, v, g, seg, chunk=chunk, normalize=normalize, interpret=interpret)


def _reference_form(fq, fk, v, g, seg, chunk, normalize):
  """The same function in jnp (identity features on phi(q), phi(k)): the backward for now."""
  return linear_chunked(fq, fk, v, feature_map="identity", decay=g, normalize=normalize,
                        chunk_size=chunk, segment_ids=seg)


def _linear_gpu_fwd(fq, fk, v, g, seg, chunk, normalize, interpret):
  out = _forward(fq, fk, v, g, seg, chunk=chunk, normalize=normalize, interpret=interpret)
  return out, (fq, fk, v, g, seg)


def _linear_gpu_bwd(chunk, normalize, interpret, res, dout):
  fq, fk, v, g, seg = res
  _, vjp = jax.vjp(lambda a, b, c, e: _reference_form(a, b, c, e, seg, chunk, normalize).astype(
      jnp.float32), fq, fk, v, g)
  return (*vjp(dout.astype(jnp.float32)), None)


_linear_gpu.defvjp(_linear_gpu_fwd, _linear_gpu_bwd)


def linear_attention_gpu(q, k, v, *, feature_map="elu1", decay=None, normalize=True,
                         chunk_size=64, segment_ids=None, interpret=None):
  """The Mosaic GPU forward (backward: autodiff of the jnp chunked form, see the docstring).
  bf16/fp16 inputs (fp32 inputs run with bf16 operands), head dims multiples of 64, chunk 64
  or 128."""
  if chunk_size not in (64, 128):
    raise ValueError(f"linear_attention: the Mosaic GPU kernel takes chunk_size 64 or 128; got "
                     f"{chunk_size}")
  if q.shape[-1] % 64 or v.shape[-1] % 64:
    raise ValueError(f"linear_attention: the Mosaic GPU kernel takes head dims that are "
                     f"multiples of 64; got {q.shape[-1]} and {v.shape[-1]}")
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
