"""Chunked causal linear attention (with decay) as Pallas TPU (Mosaic) kernels: one forward
kernel and a backward in two kernels (dq in time order; dk and dv in reverse time order). No
chunk state is stored: each kernel carries the running state (or its gradient) in VMEM scratch
across the chunks of one (batch, head), so the backward recomputes states instead of reading
T/C of them from memory.

Per chunk of C tokens, with phi already applied (Q, K [C, D], V [C, Dv]), b the cumulative
log-gate inside the chunk and S [D, Dv], z [1, D] the state at the chunk's start:
  W_ij = exp(b_i - b_j) [j <= i, same segment]          A = (Q K^T) * W
  num  = A V + (qs * Q) S                               den = A 1 + (qs * Q) z^T
  S'   = decay S + (ks * K)^T V                         z'  = decay z + 1^T (ks * K)
where qs_i = exp(b_i) if no segment starts in the chunk up to i (else 0), ks_j = exp(b_last -
b_j) if no segment starts after j in the chunk (else 0), and decay = qs_last. Every exponent is
<= 0, so strongly negative gates underflow to 0 instead of overflowing. The gate gradient is not
computed in the kernels: with c the global cumulative log-gate, dL/dc_t = phi(q_t).dq_t -
phi(k_t).dk_t (each pair (t, s) adds the same term at t and removes it at s), and dL/dg is its
reverse cumulative sum.

Layout inside: [B, H, T, D] (the wrapper transposes and pads T to a multiple of C); grid
(batch, query head, chunk), the chunk axis sequential. Key/value head h // (Hq // Hkv) is read
through the index maps (no repeat in memory); dk and dv are written per query head and summed
over each group in jnp. Per-token scalars travel as [.., T, 1] columns, and the row copies
needed for b_i - b_j as [.., n, 1, C] so that every block is a legal TPU tile for C = 64 or 128.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import cdiv, segment_start_mask, StaticConfig
from pallas_kernels.linear.reference import EPS, apply_feature_map, log_gates

SEMANTICS = ("parallel", "parallel", "arbitrary")


def _dot(a, b, contract_a=1, contract_b=0):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _intra_weights(bc_ref, br_ref, sc_ref, sr_ref, chunk):
  """W [C, C]: exp(b_i - b_j) where j <= i and both are in the same segment, else 0."""
  row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  keep = (col <= row) & (sc_ref[...] == sr_ref[...])
  diff = bc_ref[...] - br_ref[...]
  return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


# ---- kernels -------------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, qs_ref, ks_ref, sc_ref, sr_ref, *rest,
                normalize, chunk):
  if normalize:
    o_ref, den_ref, s_scr, z_scr = rest
  else:
    (o_ref, s_scr), z_scr = rest, None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = jnp.zeros(s_scr.shape, jnp.float32)
    if normalize:
      z_scr[...] = jnp.zeros(z_scr.shape, jnp.float32)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  mm = v.dtype  # matmul input dtype (bf16 inputs stay bf16 on the MXU), fp32 accumulation
  a = _dot(q, k, 1, 1) * _intra_weights(bc_ref, br_ref, sc_ref, sr_ref, chunk)
  qd = q.astype(jnp.float32) * qs_ref[...]
  state = s_scr[...]
  num = _dot(a.astype(mm), v) + _dot(qd.astype(mm), state.astype(mm))
  decay = qs_ref[chunk - 1:chunk, :]  # [1, 1]
  kd = k.astype(jnp.float32) * ks_ref[...]
  s_scr[...] = decay * state + _dot(kd.astype(mm), v, 0, 0)
  if normalize:
    z = z_scr[...]
    den = jnp.sum(a, axis=1, keepdims=True) + jnp.sum(qd * z, axis=1, keepdims=True)
    den_ref[...] = den
    o_ref[...] = (num / (den + EPS)).astype(o_ref.dtype)
    z_scr[...] = decay * z + jnp.sum(kd, axis=0, keepdims=True)
  else:
    o_ref[...] = num.astype(o_ref.dtype)


def _score_grads(dn, v, dd):
  """dA [C, C] = dnum V^T + dden 1^T: the gradient of the intra-chunk scores."""
  da = _dot(dn, v, 1, 1)
  return da if dd is None else da + dd


def _dq_kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, qs_ref, ks_ref, sc_ref, sr_ref, dn_ref, *rest,
               normalize, chunk):
  if normalize:
    dd_ref, dq_ref, s_scr, z_scr = rest
  else:
    (dq_ref, s_scr), dd_ref, z_scr = rest, None, None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_scr[...] = jnp.zeros(s_scr.shape, jnp.float32)
    if normalize:
      z_scr[...] = jnp.zeros(z_scr.shape, jnp.float32)

  q, k, v, dn = q_ref[...], k_ref[...], v_ref[...], dn_ref[...]
  mm = v.dtype
  dd = dd_ref[...] if normalize else None
  w = _intra_weights(bc_ref, br_ref, sc_ref, sr_ref, chunk)
  p = _score_grads(dn, v, dd) * w
  state = s_scr[...]
  from_state = _dot(dn, state.astype(mm), 1, 1)  # dnum S^T [C, D]
  if normalize:
    from_state = from_state + dd * z_scr[...]
  dq_ref[...] = _dot(p.astype(mm), k) + qs_ref[...] * from_state
  decay = qs_ref[chunk - 1:chunk, :]
  kd = k.astype(jnp.float32) * ks_ref[...]
  s_scr[...] = decay * state + _dot(kd.astype(mm), v, 0, 0)
  if normalize:
    z_scr[...] = decay * z_scr[...] + jnp.sum(kd, axis=0, keepdims=True)


def _dkv_kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, qs_ref, ks_ref, sc_ref, sr_ref, dn_ref, *rest,
                normalize, chunk):
  if normalize:
    dd_ref, dk_ref, dv_ref, ds_scr, dz_scr = rest
  else:
    (dk_ref, dv_ref, ds_scr), dd_ref, dz_scr = rest, None, None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    ds_scr[...] = jnp.zeros(ds_scr.shape, jnp.float32)
    if normalize:
      dz_scr[...] = jnp.zeros(dz_scr.shape, jnp.float32)

  q, k, v, dn = q_ref[...], k_ref[...], v_ref[...], dn_ref[...]
  mm = v.dtype
  dd = dd_ref[...] if normalize else None
  w = _intra_weights(bc_ref, br_ref, sc_ref, sr_ref, chunk)
  a = _dot(q, k, 1, 1) * w
  p = _score_grads(dn, v, dd) * w
  ks = ks_ref[...]
  dstate = ds_scr[...].astype(mm)  # gradient of the state after this chunk
  to_state = _dot(v, dstate, 1, 1)  # V dS^T [C, D]
  if normalize:
    to_state = to_state + dz_scr[...]
  dk_ref[...] = _dot(p.astype(mm), q, 0, 0) + ks * to_state
  kd = (k.astype(jnp.float32) * ks).astype(mm)
  dv_ref[...] = _dot(a.astype(mm), dn, 0, 0) + _dot(kd, dstate)
  decay = qs_ref[chunk - 1:chunk, :]
  qd = q.astype(jnp.float32) * qs_ref[...]
  ds_scr[...] = decay * ds_scr[...] + _dot(qd.astype(mm), dn, 0, 0)
  if normalize:
    dz_scr[...] = decay * dz_scr[...] + jnp.sum(qd * dd, axis=0, keepdims=True)


# ---- pallas_call plumbing -----------------------------------------------------------------------

def _specs(cfg, d, dv, group, n):
  """BlockSpecs for grid (b, h, c): chunk c in time order, or n - 1 - c when cfg reverse."""
  c_of = (lambda c: n - 1 - c) if cfg.reverse else (lambda c: c)
  ch = cfg.chunk
  tile = lambda width, heads=1: pl.BlockSpec(
      (None, None, ch, width), lambda b, h, c: (b, h // heads, c_of(c), 0))
  return dict(
      q=tile(d), k=tile(d, group), v=tile(dv, group), dv_out=tile(dv), col=tile(1),
      row=pl.BlockSpec((None, None, None, 1, ch), lambda b, h, c: (b, h, c_of(c), 0, 0)),
      seg_col=pl.BlockSpec((None, ch, 1), lambda b, h, c: (b, c_of(c), 0)),
      seg_row=pl.BlockSpec((None, None, 1, ch), lambda b, h, c: (b, c_of(c), 0, 0)))


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, scratch, name, *args):
  return pl.pallas_call(
      functools.partial(kernel, normalize=cfg.normalize, chunk=cfg.chunk), grid=grid,
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
      interpret=cfg.interpret, name=name)(*args)


class _Config(StaticConfig):
  """Everything static about one call (hashable, one nondiff argument of the custom_vjp)."""

  def __init__(self, *, chunk, normalize, interpret, reverse=False):
    self.chunk, self.normalize, self.interpret, self.reverse = chunk, normalize, interpret, reverse
    self.key = (chunk, normalize, id(interpret), reverse)

  def reversed(self):
    return _Config(chunk=self.chunk, normalize=self.normalize, interpret=self.interpret,
                   reverse=True)


def _chunk_scalars(g_BTH, seg_BT, chunk):
  """Pads T to n * C and returns the per-token chunk scalars, [B, H, n*C] unless said:
  b (cumulative log-gate inside each chunk), qs, ks (see the module docstring) and the padded
  segment ids [B, n*C]."""
  b, t, h = g_BTH.shape
  n = cdiv(t, chunk)
  pad = n * chunk - t
  g = jnp.pad(g_BTH, ((0, 0), (0, pad), (0, 0))).transpose(0, 2, 1).reshape(b, h, n, chunk)
  seg = jnp.pad(seg_BT, ((0, 0), (0, pad)), mode="edge")
  starts = segment_start_mask(seg).reshape(b, 1, n, chunk).astype(jnp.int32)
  bcum = jnp.cumsum(g, axis=-1)
  alive_from_start = jnp.cumsum(starts, axis=-1) == 0
  starts_after = jnp.cumsum(starts[..., ::-1], axis=-1)[..., ::-1] - starts
  alive_to_end = starts_after == 0
  qs = jnp.where(alive_from_start, jnp.exp(bcum), 0.0)
  ks = jnp.where(alive_to_end, jnp.exp(bcum[..., -1:] - bcum), 0.0)
  flat = lambda x: x.reshape(b, h, n * chunk)
  return flat(bcum), flat(qs), flat(ks), seg


def _prepare(fq, fk, v, g, seg, chunk):
  """The kernels' operands: q, k, v as [B, H, n*C, D] and the per-token scalars as columns
  [.., n*C, 1] and rows [.., n, 1, C]."""
  b, t = fq.shape[:2]
  n = cdiv(t, chunk)
  to_bhtd = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)
  bcum, qs, ks, seg = _chunk_scalars(g, seg, chunk)
  col = lambda x: x[..., None]
  row = lambda x: x.reshape(*x.shape[:-1], n, 1, chunk)
  scalars = (col(bcum), row(bcum), col(qs), col(ks), col(seg), row(seg))
  return (to_bhtd(fq), to_bhtd(fk), to_bhtd(v)) + scalars


def _forward(fq, fk, v, g, seg, cfg):
  b, t, hq, d = fq.shape
  dv = v.shape[-1]
  ops = _prepare(fq, fk, v, g, seg, cfg.chunk)
  tp = ops[0].shape[2]
  n = tp // cfg.chunk
  sp = _specs(cfg, d, dv, hq // fk.shape[2], n)
  in_specs = [sp["q"], sp["k"], sp["v"], sp["col"], sp["row"], sp["col"], sp["col"],
              sp["seg_col"], sp["seg_row"]]
  out_specs = [sp["dv_out"]]
  out_shape = [jax.ShapeDtypeStruct((b, hq, tp, dv), fq.dtype)]
  scratch = [pltpu.VMEM((d, dv), jnp.float32)]
  if cfg.normalize:
    out_specs.append(sp["col"])
    out_shape.append(jax.ShapeDtypeStruct((b, hq, tp, 1), jnp.float32))
    scratch.append(pltpu.VMEM((1, d), jnp.float32))
  outs = _call(_fwd_kernel, cfg, (b, hq, n), in_specs, out_specs, out_shape, scratch,
               "lmtrain_linear_fwd", *ops)
  o = outs[0]
  den = outs[1] if cfg.normalize else None
  return o[:, :, :t].transpose(0, 2, 1, 3), (ops, o, den)


def _backward(res, do, cfg, shapes):
  ops, o, den = res
  b, t, hq, d, hkv = shapes
  fq_t, fk_t, v_t = ops[:3]
  tp, dv = o.shape[2], o.shape[3]
  n = tp // cfg.chunk
  group = hq // hkv
  mm = v_t.dtype
  do_t = jnp.pad(do, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3).astype(
      jnp.float32)
  extra = []
  if cfg.normalize:  # out = num / (den + eps): the gradients of num and den, in jnp
    inv = 1.0 / (den + EPS)
    dn = do_t * inv
    extra = [-jnp.sum(do_t * o.astype(jnp.float32), axis=-1, keepdims=True) * inv]
  else:
    dn = do_t
  args = ops + (dn.astype(mm), *extra)
  scratch_state = [pltpu.VMEM((d, dv), jnp.float32)]
  if cfg.normalize:
    scratch_state.append(pltpu.VMEM((1, d), jnp.float32))

  sp = _specs(cfg, d, dv, group, n)
  in_specs = [sp["q"], sp["k"], sp["v"], sp["col"], sp["row"], sp["col"], sp["col"],
              sp["seg_col"], sp["seg_row"], sp["dv_out"]] + [sp["col"]] * len(extra)
  dq = _call(_dq_kernel, cfg, (b, hq, n), in_specs, sp["q"],
             jax.ShapeDtypeStruct((b, hq, tp, d), jnp.float32), scratch_state,
             "lmtrain_linear_dq", *args)

  rcfg = cfg.reversed()
  sp = _specs(rcfg, d, dv, group, n)
  in_specs = [sp["q"], sp["k"], sp["v"], sp["col"], sp["row"], sp["col"], sp["col"],
              sp["seg_col"], sp["seg_row"], sp["dv_out"]] + [sp["col"]] * len(extra)
  dk, dvv = _call(_dkv_kernel, rcfg, (b, hq, n), in_specs, [sp["q"], sp["dv_out"]],
                  [jax.ShapeDtypeStruct((b, hq, tp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hq, tp, dv), jnp.float32)], scratch_state,
                  "lmtrain_linear_dkv", *args)

  # dL/dc_t = phi(q_t).dq_t - phi(k_t).dk_t per query head; dL/dg = reverse cumsum over time.
  fk_grouped = fk_t.astype(jnp.float32)[:, :, None]  # [B, Hkv, 1, Tp, D]
  dk_grouped = dk.reshape(b, hkv, group, tp, d)
  dc = (jnp.sum(fq_t.astype(jnp.float32) * dq, axis=-1)
        - jnp.sum(fk_grouped * dk_grouped, axis=-1).reshape(b, hq, tp))
  dg = jnp.cumsum(dc[..., ::-1], axis=-1)[..., ::-1][:, :, :t].transpose(0, 2, 1)

  fold = lambda x: x.reshape(b, hkv, group, tp, -1).sum(axis=2)[:, :, :t].transpose(0, 2, 1, 3)
  back = lambda x: x[:, :, :t].transpose(0, 2, 1, 3)
  return back(dq).astype(fq_t.dtype), fold(dk).astype(fk_t.dtype), fold(dvv).astype(mm), dg


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear(fq, fk, v, g, seg, cfg):
  return _forward(fq, fk, v, g, seg, cfg)[0]


def _linear_fwd(fq, fk, v, g, seg, cfg):
  o, res = _forward(fq, fk, v, g, seg, cfg)
  return o, (res, fq.shape + (fk.shape[2],))


def _linear_bwd(cfg, saved, do):
  res, shapes = saved
  dq, dk, dv, dg = _backward(res, do, cfg, shapes)
  return dq, dk, dv, dg, None  # g is fp32 (log_gates), as dg


_linear.defvjp(_linear_fwd, _linear_bwd)


KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def linear_attention_tpu(q, k, v, *, feature_map="elu1", decay=None, normalize=True,
                         chunk_size=64, segment_ids=None, interpret=None):
  """The TPU kernel behind linear_attention(impl="pallas"); interpret=pltpu.InterpretParams()
  runs it on the CPU. The feature map and the broadcast of a per-head decay are jnp around the
  kernel (autodiff carries their gradients); the kernel sees phi(q), phi(k) in the input dtype
  and log-gates [B, T, Hq] in fp32."""
  if q.dtype not in KERNEL_DTYPES:
    raise ValueError(f"linear_attention: the Pallas kernel takes float32/bfloat16/float16 inputs, "
                     f"got {q.dtype} (impl='reference' or 'xla' take any float)")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"linear_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  fq = apply_feature_map(q.astype(jnp.float32), feature_map).astype(q.dtype)
  fk = apply_feature_map(k.astype(jnp.float32), feature_map).astype(k.dtype)
  g = log_gates(decay, q)
  b, t = q.shape[:2]
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  cfg = _Config(chunk=chunk_size, normalize=normalize, interpret=interpret or False)
  return _linear(fq, fk, v, g, seg, cfg)
