"""The Mosaic GPU flash-attention kernels on the CPU: semantics in Mosaic GPU interpret mode
(forward and the three gradients against the dense fp32 reference, memory the kernels never
write is NaN), and lowering for CUDA with jax.export, which runs the whole Pallas -> Mosaic GPU
lowering (layouts, wgmma shapes, TMA) without a GPU. Interpret mode takes wgmma operands from
shared memory only, so there register operands are staged through it (stage_in_smem); the
export tests lower the register path that a GPU runs."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import SlidingWindow, blockwise_attention, sparse_attention
from pallas_kernels.blockwise import api as blockwise_api
from pallas_kernels.blockwise import dense_attention
from pallas_kernels.blockwise.pallas_gpu import (_kv_range, _q_range, _tile_is_whole,
                                                 flash_attention_gpu)
from pallas_kernels.sparse import api as sparse_api
from pallas_kernels.sparse import sparse_reference
from pallas_kernels.sparse.pallas_gpu import sparse_flash_gpu

BF16_RTOL = 2e-2  # bf16 operands (P and dS are rounded to bf16 before their matmuls)


def inputs(seed, b, t, hq, hkv, d, segments, dtype=jnp.bfloat16):
  r = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(r.normal(size=shape), dtype)
  seg = None
  if segments:
    seg = jnp.asarray(np.sort(r.integers(1, 4, size=(b, t)), axis=1).astype(np.int32))
  cot = jnp.asarray(r.normal(size=(b, t, hq, d)), jnp.float32)
  return mk(b, t, hq, d), mk(b, t, hkv, d), mk(b, t, hkv, d), seg, cot


def check_against_reference(q, k, v, seg, cot, *, causal, pattern=None, schedule="ws",
                            backward="split", window=None, gates=None, slopes=None):
  """Asserts out, dq, dk, dv of the kernels (flash_attention_gpu with the schedule, backward
  and window given, or sparse_flash_gpu for a pattern) equal the fp32 reference's on the same
  (bf16-rounded) values; with gates [B, T, Hq] (FoX's log forget gates) also their gradient;
  slopes [Hq]: ALiBi."""
  if window is not None:
    assert pattern is None
    flash_window, pattern_of_reference = window, SlidingWindow(window)
  else:
    flash_window, pattern_of_reference = None, pattern
  interp = plgpu.InterpretGPUParams(uninitialized_memory="nan")
  f32 = lambda x: x.astype(jnp.float32)

  bias = lambda g: dict(log_gates=g[0] if g else None, alibi_slopes=slopes)

  def kernel(q, k, v, *g):
    if pattern is None:
      out = flash_attention_gpu(q, k, v, causal=causal, segment_ids=seg, interpret=interp,
                                schedule=schedule, backward=backward, window=flash_window,
                                **bias(g))
    else:
      assert not g
      out = sparse_flash_gpu(q, k, v, pattern=pattern, causal=causal, segment_ids=seg,
                             interpret=interp, alibi_slopes=slopes)
    return jnp.sum(f32(out) * cot), out

  def reference(q, k, v, *g):
    if pattern_of_reference is None:
      out = dense_attention(f32(q), f32(k), f32(v), causal=causal, segment_ids=seg, **bias(g))
    else:
      out = sparse_reference(f32(q), f32(k), f32(v), pattern=pattern_of_reference,
                             causal=causal, segment_ids=seg, alibi_slopes=slopes)
    return jnp.sum(out * cot), out

  args = (q, k, v) + (() if gates is None else (gates,))
  argnums = tuple(range(len(args)))
  (_, o1), g1 = jax.value_and_grad(kernel, argnums=argnums, has_aux=True)(*args)
  (_, o2), g2 = jax.value_and_grad(reference, argnums=argnums, has_aux=True)(*args)
  assert o1.dtype == q.dtype and all(g.dtype == x.dtype for g, x in zip(g1, args))
  for name, got, want in zip(("out", "dq", "dk", "dv", "dgates"), (o1, *g1), (o2, *g2)):
    got = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got)), f"{name}: unwritten (NaN-poisoned) or non-finite values"
    scale = max(float(jnp.max(jnp.abs(want))), 1.0)
    np.testing.assert_allclose(got, want, atol=BF16_RTOL * scale, rtol=BF16_RTOL, err_msg=name)


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(33, 150), ratio=st.sampled_from([1, 2, 4]), causal=st.booleans(),
       segments=st.booleans(), seed=st.integers(0, 99))
def test_kernel_matches_reference_on_random_shapes(t, ratio, causal, segments, seed):
  hkv = 2 if ratio < 4 else 1
  q, k, v, seg, cot = inputs(seed, 1, t, hkv * ratio, hkv, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=causal)


@pytest.mark.parametrize("schedule,t,causal,ratio,segments", [
    ("ws", 150, True, 2, True), ("ws", 200, False, 1, False), ("one_warpgroup", 190, True, 4, False),
    ("one_warpgroup", 200, False, 1, False)])
def test_both_forward_schedules_match_reference(schedule, t, causal, ratio, segments):
  """The warp-specialised forward and the plain pipelined one (schedule="one_warpgroup"; the
  tables of MoBA and block masks always take it) on the causal / full formula; without segment
  ids the kernels mask the ragged tail by position alone."""
  q, k, v, seg, cot = inputs(9, 1, t, 2 * ratio, 2, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=causal, schedule=schedule)


@pytest.mark.parametrize("d", [256])  # 64 above, 128 in the lowering tests and on the device
def test_head_dims(d):
  q, k, v, seg, cot = inputs(1, 1, 70, 2, 1, d, True)
  check_against_reference(q, k, v, seg, cot, causal=True)


@pytest.mark.parametrize("window,causal,t", [(5, True, 150), (100, False, 140), (1000, True, 90)])
def test_sliding_window_below_and_above_the_block(window, causal, t):
  q, k, v, seg, cot = inputs(4, 1, t, 2, 1, 64, True)
  check_against_reference(q, k, v, seg, cot, causal=causal, pattern=SlidingWindow(window))


def visible_blocks(qi, n, bq, bk, causal, window):
  """Brute force: the key blocks holding a key that some query of block qi sees."""
  return [ki for ki in range(n) if any(
      abs(qq - kk) < window and (kk <= qq or not causal)
      for qq in range(qi * bq, qi * bq + bq) for kk in range(ki * bk, ki * bk + bk))]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 64, 100, 1000])
@pytest.mark.parametrize("bq,bk", [(64, 64), (128, 128), (128, 64)])
def test_sliding_window_pipelines_visit_the_band_only(causal, window, bq, bk):
  """The forward/dq key-block range and the dk/dv query-block range equal the brute-force band:
  nothing outside it is loaded, nothing inside it skipped (128 x 128: the warp-specialised
  forward's CTA and key tile)."""
  n = 10
  visible = {qi: visible_blocks(qi, n, bq, bk, causal, window) for qi in range(n)}
  for i in range(n):
    first, end = (int(x) for x in _kv_range(i * bq, bq=bq, bk=bk, nk=n, causal=causal,
                                            window=window))
    assert list(range(first, end)) == visible[i]
    first, end = (int(x) for x in _q_range(i * bk, bq=bq, bk=bk, nq=n, causal=causal,
                                           window=window))
    assert list(range(first, end)) == [qi for qi in range(n) if i in visible[qi]]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 70, 200])
@pytest.mark.parametrize("s_len", [256, 250])
def test_whole_tiles_are_exactly_those_position_keeps_entirely(causal, window, s_len):
  """The kernels skip the mask on tiles _tile_is_whole calls whole: brute force over every
  64 x 64 and 64 x 128 tile of a 256-token padded sequence (and a ragged one of 250 keys),
  whole iff every pair of the tile is kept by position."""
  for rows, cols in ((64, 64), (64, 128)):
    for q0 in range(0, 256, rows):
      for k0 in range(0, 256, cols):
        q = np.arange(q0, q0 + rows)[:, None]
        k = np.arange(k0, k0 + cols)[None, :]
        kept = k < s_len
        if causal:
          kept = kept & (k <= q)
        if window is not None:
          kept = kept & (np.abs(q - k) < window)
        got = _tile_is_whole(q0, k0, rows=rows, cols=cols, s_len=s_len, padded_len=256,
                             causal=causal, window=window, segments=False)
        assert bool(got) == bool(kept.all()), (q0, k0, rows, cols)
  assert _tile_is_whole(0, 0, rows=64, cols=64, s_len=256, padded_len=256, causal=False,
                        window=None, segments=True) is None


@pytest.mark.parametrize("t,block,top_k,segments", [(300, 64, 3, True), (130, 64, 1, True)])
def test_moba_matches_reference(t, block, top_k, segments):
  """MoBA on the GPU kernels: top_k 1 (own block only), below and above the number of blocks,
  ragged T; forward and gradients against the dense masked reference."""
  q, k, v, seg, cot = inputs(7, 1, t, 2, 1, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=True, pattern=sparse_api.MoBA(block, top_k))


@pytest.mark.parametrize("t,causal,empty_row", [(300, True, False), (250, False, True)])
def test_block_mask_matches_reference(t, causal, empty_row):
  """Random block masks (a ragged tail; a query block with no key block at all) through the
  kernels' block lists: forward and gradients against the dense masked reference."""
  n = -(-t // 64)
  mask = np.random.default_rng(t).random((n, n)) < 0.5
  if empty_row:
    mask[1] = False
  q, k, v, seg, cot = inputs(8, 1, t, 2, 1, 64, True)
  check_against_reference(q, k, v, seg, cot, causal=causal,
                          pattern=sparse_api.BlockMask(64, mask))


def test_block_mask_lists_hold_exactly_the_kept_causal_tiles():
  from pallas_kernels.sparse.pallas_gpu import tile_lists
  mask = np.eye(4, dtype=bool) | (np.arange(4)[None, :] == 0)  # local + sink, blocks of 128
  kv, qs = tile_lists(sparse_api.BlockMask(128, mask), 500, 500, causal=True)
  visited = {(i, int(j)) for i, row in enumerate(kv) for j in row[1:1 + row[0]]}
  want = {(i, j) for i in range(8) for j in range(8)
          if j <= i and mask[i // 2, j // 2]}
  assert visited == want
  assert {(int(i), j) for j, row in enumerate(qs) for i in row[1:1 + row[0]]} == want


def test_moba_lowers_for_cuda_forward_and_backward():
  q, k, v, seg, _ = inputs(0, 2, 1000, 4, 2, 128, True)

  def loss(q, k, v):
    return jnp.sum(sparse_flash_gpu(q, k, v, pattern=sparse_api.MoBA(256, 3), segment_ids=seg)
                   .astype(jnp.float32))

  text = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                       platforms=("cuda",))(q, k, v).mlir_module()
  assert text.count("mosaic_gpu") >= 6, "the own-block and routed forward, dq and dk/dv kernels"


@pytest.mark.parametrize("d,causal,ratio,window,schedule,segments,backward", [
    (64, True, 1, None, "ws", True, "split"), (128, True, 4, None, "ws", True, "split"),
    (128, False, 2, None, "ws", True, "split"), (256, True, 2, None, "ws", True, "split"),
    (128, True, 2, 300, "ws", True, "split"), (128, True, 2, None, "one_warpgroup", True, "split"),
    (128, True, 1, None, "ws", False, "split"),
    (128, True, 4, None, "ws", True, "fused"), (64, False, 1, None, "ws", False, "fused"),
    (128, True, 2, 300, "ws", True, "fused"), (128, True, 2, None, "one_warpgroup", True, "fused"),
    (256, True, 2, None, "ws", True, "fused")])
def test_lowers_for_cuda_forward_and_backward(d, causal, ratio, window, schedule, segments,
                                              backward):
  """The path a GPU runs (register operands, no staging; the fused backward's TMA reduce-add)
  lowers through Mosaic GPU, within Hopper's shared memory: the forward, dq and dk/dv kernels,
  or with backward="fused" the forward and one backward kernel (head dim 256 falls back to the
  split backward)."""
  q, k, v, seg, _ = inputs(0, 2, 1000, 2 * ratio, 2, d, segments)

  def loss(q, k, v):
    return jnp.sum(flash_attention_gpu(q, k, v, causal=causal, segment_ids=seg, window=window,
                                       schedule=schedule, backward=backward).astype(jnp.float32))

  exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                           platforms=("cuda",))(q, k, v)
  kernels = re.findall(r"stablehlo.custom_call @mosaic_gpu", exported.mlir_module())
  assert len(kernels) == (2 if backward == "fused" and d <= 128 else 3)


@pytest.mark.parametrize("schedule,t,causal,ratio,segments,window", [
    ("ws", 200, False, 1, False, None), ("one_warpgroup", 190, True, 4, True, None),
    ("ws", 230, True, 2, False, 70)])
def test_fused_backward_matches_reference(schedule, t, causal, ratio, segments, window):
  """backward="fused" (dq added from the dk/dv kernel into fp32 memory): forward and the three
  gradients against the reference, GQA 1/2/4, ragged T, segments, a sliding window. Interpret
  mode replaces the TMA reduce-add by load + add + store (its CTAs run one at a time)."""
  q, k, v, seg, cot = inputs(5, 1, t, 2 * ratio, 2, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=causal, schedule=schedule,
                          backward="fused", window=window)


def test_fp32_inputs_come_back_fp32():
  q, k, v, _, _ = inputs(2, 1, 64, 2, 2, 64, False, dtype=jnp.float32)
  out = flash_attention_gpu(q, k, v, interpret=plgpu.InterpretGPUParams())
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, dense_attention(q, k, v), atol=3e-2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d=32), "head dims 64, 128, 192 or 256; got 32"),
    (dict(block_q=96), "multiples of 64"),
    (dict(alibi=True), "takes alibi_slopes only for causal self-attention"),
    (dict(schedule="fa4"), "schedule='fa4' is not one of ws, one_warpgroup"),
    (dict(backward="atomic"), "backward='atomic' is not one of split, fused"),
])
def test_bad_inputs_get_one_line_errors(kwargs, match):
  d = kwargs.get("d", 64)
  q = jnp.zeros((1, 64, 2, d), jnp.bfloat16)
  extra = {"alibi_slopes": jnp.ones((2,)), "causal": False} if kwargs.get("alibi") else {}
  with pytest.raises(ValueError, match=match):
    flash_attention_gpu(q, q, q, block_q=kwargs.get("block_q", 64),
                        schedule=kwargs.get("schedule", "ws"),
                        backward=kwargs.get("backward", "split"), **extra)


def test_api_interpret_gpu_and_auto_keeps_cudnn_on_gpu(monkeypatch):
  q, k, v, seg, _ = inputs(3, 1, 70, 2, 1, 64, True)
  got = blockwise_attention(q, k, v, segment_ids=seg, impl="interpret_gpu")
  want = dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids=seg)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)
  assert blockwise_api.kernel_for("pallas", "gpu") is flash_attention_gpu
  monkeypatch.setattr(blockwise_api._common, "backend", lambda: "gpu")
  assert blockwise_api.resolve_impl("auto") == "cudnn"  # until the GPU kernel is measured
  assert blockwise_api.resolve_impl("auto", segments=True) == "reference"  # no dense mask
  assert sparse_api.resolve_impl("auto") == "xla"
  with pytest.raises(ValueError, match="block_size a multiple of 64; got 32"):
    sparse_flash_gpu(q, k, v, pattern=sparse_api.BlockMask(32, np.ones((3, 3), bool)))


def test_sparse_api_interpret_gpu_runs_the_window_kernel():
  q, k, v, seg, _ = inputs(6, 1, 90, 2, 2, 64, False)
  got = sparse_attention(q, k, v, pattern=SlidingWindow(20), impl="interpret_gpu")
  f32 = lambda x: x.astype(jnp.float32)
  want = sparse_reference(f32(q), f32(k), f32(v), pattern=SlidingWindow(20))
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


class _FakeGpu:
  def __init__(self, kind, capability):
    self.device_kind, self.compute_capability = kind, capability


@pytest.mark.parametrize("kind,capability,ok", [("NVIDIA H200", "9.0", True),
                                                ("NVIDIA A100-SXM4-80GB", "8.0", False),
                                                ("NVIDIA B200", "10.0", False)])
def test_pallas_on_a_non_hopper_gpu_is_a_one_line_error(monkeypatch, kind, capability, ok):
  """impl='pallas' on a GPU without wgmma/TMA (sm_90a) says so before compiling anything, for
  every family; on Hopper the check passes."""
  from pallas_kernels import _common, linear_attention
  monkeypatch.setattr(_common, "backend", lambda: "gpu")
  monkeypatch.setattr(_common.jax, "devices", lambda *a: [_FakeGpu(kind, capability)])
  if ok:
    _common.check_hopper("blockwise_attention")
    return
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  for run in (lambda: blockwise_attention(q, q, q, impl="pallas"),
              lambda: linear_attention(q, q, q, impl="pallas"),
              lambda: sparse_attention(q, q, q, pattern=SlidingWindow(16), impl="pallas")):
    with pytest.raises(ValueError, match=f"compute capability 9.x.*{kind}.*{capability}"):
      run()


def log_gates(seed, b, t, hq, high=0.5):
  r = np.random.default_rng(seed)
  return jnp.asarray(-r.uniform(0.0, high, size=(b, t, hq)).astype(np.float32))


@pytest.mark.parametrize("schedule,backward,t,ratio,segments,high", [
    ("ws", "split", 150, 2, True, 0.5), ("one_warpgroup", "fused", 100, 4, True, 30.0)])
def test_forget_gates_match_reference(schedule, backward, t, ratio, segments, high):
  """FoX's gate bias on both schedules and both backwards: out and the gradients of q, k, v
  and the gates (the keys' share summed per query head in the dk/dv kernel) against the fp32
  reference; GQA, ragged T, packed documents, and strong decay (high=30: whole key tiles
  underflow to exact zeros)."""
  q, k, v, seg, cot = inputs(13, 1, t, 2 * ratio, 2, 64, segments)
  check_against_reference(q, k, v, seg, cot, causal=True, schedule=schedule, backward=backward,
                          gates=log_gates(t, 1, t, 2 * ratio, high))


def test_alibi_on_the_sliding_window_kernel():
  """ALiBi (constant gates) with a sliding window, through sparse_flash_gpu."""
  q, k, v, seg, cot = inputs(14, 1, 140, 2, 1, 64, True)
  check_against_reference(q, k, v, seg, cot, causal=True, pattern=SlidingWindow(70),
                          slopes=jnp.asarray([0.5, 1 / 64], jnp.float32))
  with pytest.raises(ValueError, match="block-mask kernels do not take alibi_slopes"):
    sparse_flash_gpu(q, k, v, pattern=sparse_api.BlockMask(64, np.ones((3, 3), bool)),
                     alibi_slopes=jnp.ones((2,)))


@pytest.mark.parametrize("d,schedule,backward", [(128, "ws", "split"), (128, "ws", "fused"),
                                                 (64, "one_warpgroup", "split"),
                                                 (256, "ws", "fused")])
def test_forget_gates_lower_for_cuda(d, schedule, backward):
  """The gated kernels (forward, dq with the gates' row sums, dk/dv with their column sums)
  lower through Mosaic GPU within Hopper's shared memory: 3 kernels whatever the backward asked
  for (the gates' row sums need the dq kernel, so gated calls run the split backward)."""
  q, k, v, seg, _ = inputs(0, 2, 1000, 4, 2, d, True)
  gates = log_gates(0, 2, 1000, 4)

  def loss(q, k, v, g):
    return jnp.sum(flash_attention_gpu(q, k, v, segment_ids=seg, log_gates=g, schedule=schedule,
                                       backward=backward).astype(jnp.float32))

  exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))),
                           platforms=("cuda",))(q, k, v, gates)
  kernels = re.findall(r"stablehlo.custom_call @mosaic_gpu", exported.mlir_module())
  assert len(kernels) == 3
