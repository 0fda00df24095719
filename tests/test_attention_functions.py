"""pallas_kernels' jnp paths: against independent float64 references, against each other, and
their gradients against finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import (BlockMask, MoBA, SlidingWindow, block_mask, blockwise_attention,
                            linear_attention, linear_attention_init_state, linear_attention_step,
                            sparse_attention)
from pallas_kernels.blockwise import blockwise_reference, dense_attention
from pallas_kernels.linear import linear_chunked, linear_parallel, linear_recurrent
from pallas_kernels.sparse import block_lists, moba_routing, sparse_blockwise, sparse_reference
from tests import naive


@pytest.fixture(autouse=True)
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def qkv(b=2, t=37, hq=4, hkv=2, d=8, s=None, seed=0, dtype=np.float64):
  r = np.random.default_rng(seed)
  s = t if s is None else s
  mk = lambda *shape: jnp.asarray(r.normal(size=shape).astype(dtype))
  return mk(b, t, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d)


def packed_segments(b, t, seed=0):
  r = np.random.default_rng(seed)
  return jnp.asarray(np.sort(r.integers(1, 4, size=(b, t)), axis=1).astype(np.int32))


# ---- softmax: blockwise ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_blockwise_matches_naive_float64(causal, hq, hkv):
  q, k, v = qkv(hq=hq, hkv=hkv, t=29)
  seg = packed_segments(2, 29)
  allowed = lambda b, h, t, s: seg[b, t] == seg[b, s]
  want = naive.softmax_attention(q, k, v, allowed, causal=causal)
  for impl in ("reference", "xla"):
    got = blockwise_attention(q, k, v, causal=causal, segment_ids=seg, impl=impl)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_blockwise_reference_equals_dense_fp32_with_alibi_and_odd_length():
  q, k, v = qkv(t=77, dtype=np.float32)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
  for causal in (True, False):
    want = dense_attention(q, k, v, causal=causal, alibi_slopes=slopes)
    got = blockwise_reference(q, k, v, causal=causal, alibi_slopes=slopes, block_k=16)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  want = naive.softmax_attention(q, k, v, lambda *a: True, alibi=np.asarray(slopes))
  np.testing.assert_allclose(blockwise_attention(q, k, v, alibi_slopes=slopes), want, atol=1e-5)


def test_blockwise_cross_attention_lengths():
  q, k, v = qkv(t=9, s=21)
  want = naive.softmax_attention(q, k, v, lambda *a: True, causal=False)
  np.testing.assert_allclose(blockwise_attention(q, k, v, causal=False), want, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_reference_query_tiles_equal_the_naive_float64(causal):
  """Query tiles of 4 (29 queries: the last tile padded) over key blocks of 8, with GQA,
  packed segments and ALiBi, and a cross-attention length: the float64 naive result, and the
  same gradients as one tile of every query."""
  q, k, v = qkv(hq=4, hkv=2, t=29)
  seg = packed_segments(2, 29)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
  allowed = lambda b, h, t, s: seg[b, t] == seg[b, s]
  want = naive.softmax_attention(q, k, v, allowed, causal=causal, alibi=np.asarray(slopes))
  tiled = lambda q, k, v, bq: blockwise_reference(q, k, v, causal=causal, segment_ids=seg,
                                                  alibi_slopes=slopes, block_q=bq, block_k=8)
  np.testing.assert_allclose(tiled(q, k, v, 4), want, atol=1e-12)
  r = jnp.asarray(np.random.default_rng(3).normal(size=q.shape))
  grads = [jax.grad(lambda *a: jnp.sum(tiled(*a, bq) * r), argnums=(0, 1, 2))(q, k, v)
           for bq in (4, 29)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=1e-12)
  q9, k21, v21 = qkv(t=9, s=21)
  want = naive.softmax_attention(q9, k21, v21, lambda *a: True, causal=False)
  got = blockwise_reference(q9, k21, v21, causal=False, block_q=4, block_k=8)
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("fn", [
    lambda q, k, v: blockwise_reference(q, k, v, block_k=8),
    lambda q, k, v: blockwise_reference(q, k, v, block_q=4, block_k=8,
                                        segment_ids=packed_segments(1, 11)),
    lambda q, k, v: blockwise_reference(q, k, v, causal=False, block_k=8,
                                        segment_ids=packed_segments(1, 11)),
    lambda q, k, v: dense_attention(q, k, v),
])
def test_blockwise_gradients_match_finite_differences(fn):
  q, k, v = qkv(b=1, t=11, hq=2, hkv=1, d=4)
  check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- linear ------------------------------------------------------------------------------------

DECAYS = ["none", "constant", "gates", "strong_gates"]


def make_decay(kind, b, t, hq, seed=1):
  r = np.random.default_rng(seed)
  if kind == "none":
    return None
  if kind == "constant":
    return jnp.asarray(-r.uniform(0.01, 1.0, size=(hq,)))
  if kind == "gates":
    return jnp.asarray(-r.uniform(0.0, 1.0, size=(b, t, hq)))
  return jnp.asarray(-r.uniform(5.0, 30.0, size=(b, t, hq)))  # decays to ~0 within a step


def as_gates(decay, b, t, hq):
  if decay is None:
    return None
  return np.broadcast_to(np.asarray(decay), (b, t, hq)) if decay.ndim == 1 else np.asarray(decay)


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("fmap,normalize", [("elu1", True), ("relu", True), ("identity", False),
                                            ("elu1", False)])
def test_linear_forms_match_naive_float64(decay_kind, fmap, normalize):
  q, k, v = qkv(t=23, hq=4, hkv=2)
  decay = make_decay(decay_kind, 2, 23, 4)
  want = naive.linear_attention(q, k, v, feature_map=fmap, log_gates=as_gates(decay, 2, 23, 4),
                                normalize=normalize)
  kw = dict(feature_map=fmap, decay=decay, normalize=normalize)
  tol = dict(atol=1e-9, rtol=1e-9)
  np.testing.assert_allclose(linear_parallel(q, k, v, **kw), want, **tol)
  np.testing.assert_allclose(linear_recurrent(q, k, v, **kw), want, **tol)
  for chunk in (4, 7, 64):  # 23 is not a multiple of any of them
    np.testing.assert_allclose(linear_chunked(q, k, v, chunk_size=chunk, **kw), want, **tol)
  np.testing.assert_allclose(linear_attention(q, k, v, chunk_size=8, **kw), want, **tol)


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_linear_segments_match_naive(decay_kind):
  q, k, v = qkv(t=30)
  seg = packed_segments(2, 30, seed=3)
  decay = make_decay(decay_kind, 2, 30, 4)
  want = naive.linear_attention(q, k, v, log_gates=as_gates(decay, 2, 30, 4),
                                segment_ids=np.asarray(seg))
  for fn in (linear_parallel, linear_recurrent):
    np.testing.assert_allclose(fn(q, k, v, decay=decay, segment_ids=seg), want, atol=1e-9)
  for chunk in (4, 8, 32):
    np.testing.assert_allclose(linear_chunked(q, k, v, decay=decay, segment_ids=seg,
                                              chunk_size=chunk), want, atol=1e-9)


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_recurrent_decoding_step_by_step_equals_chunked(decay_kind):
  b, t, hq, hkv, d = 2, 19, 4, 2, 8
  q, k, v = qkv(b=b, t=t, hq=hq, hkv=hkv, d=d)
  decay = make_decay(decay_kind, b, t, hq)
  state = linear_attention_init_state(b, hq, d, d, jnp.float64)
  outs = []
  for i in range(t):
    d_t = None if decay is None else (decay if decay.ndim == 1 else decay[:, i])
    state, o = linear_attention_step(state, q[:, i], k[:, i], v[:, i], decay=d_t)
    outs.append(o)
  np.testing.assert_allclose(jnp.stack(outs, 1), linear_chunked(q, k, v, decay=decay,
                                                                chunk_size=8), atol=1e-10)


@pytest.mark.parametrize("decay_kind", ["none", "constant", "gates"])
def test_linear_gradients_match_finite_differences(decay_kind):
  q, k, v = qkv(b=1, t=10, hq=2, hkv=1, d=3)
  decay = make_decay(decay_kind, 1, 10, 2)
  if decay is None:
    check_grads(lambda q, k, v: linear_chunked(q, k, v, chunk_size=4), (q, k, v), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)
  else:  # gradients of the gates too
    check_grads(lambda q, k, v, g: linear_chunked(q, k, v, decay=g, chunk_size=4),
                (q, k, v, decay), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- sparse ------------------------------------------------------------------------------------

def window_allowed(w):
  return lambda b, h, t, s: t - w < s <= t


@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sliding_window_matches_naive(window, impl):
  q, k, v = qkv(t=45, hq=4, hkv=2)
  want = naive.softmax_attention(q, k, v, window_allowed(window))
  got = sparse_attention(q, k, v, pattern=SlidingWindow(window), impl=impl)
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_block_mask_matches_naive(impl):
  t, bs = 45, 8
  mask = block_mask(6, local=2, global_blocks=1, stride=3)
  q, k, v = qkv(t=t)
  allowed = lambda b, h, ti, s: bool(mask[ti // bs, s // bs])
  want = naive.softmax_attention(q, k, v, allowed)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=BlockMask(bs, mask), impl=impl),
                             want, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_moba_matches_naive_routing_and_attention(top_k, impl):
  t, bs = 47, 8  # 6 blocks, the last one ragged: top_k < number of blocks
  q, k, v = qkv(t=t, hq=4, hkv=2, seed=5)
  chosen = naive.moba_blocks(q, k, bs, top_k)
  allowed = lambda b, h, ti, s: s // bs in chosen[b, h, ti]
  want = naive.softmax_attention(q, k, v, allowed)
  got = sparse_attention(q, k, v, pattern=MoBA(bs, top_k), impl=impl)
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_moba_routing_picks_the_highest_block_means():
  q, k, _ = qkv(t=40, seed=7)
  routes = np.asarray(moba_routing(q, k, block_size=8, top_k=3))
  chosen = naive.moba_blocks(q, k, 8, 3)
  for (b, h, t), blocks in chosen.items():
    got = {int(j) for j in routes[b, t, h] if j >= 0} | {t // 8}
    assert got == blocks


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_full_patterns_equal_causal_softmax(impl):
  t = 50
  q, k, v = qkv(t=t, dtype=np.float32)
  causal = dense_attention(q, k, v)
  tol = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=SlidingWindow(t), impl=impl),
                             causal, **tol)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=SlidingWindow(10 * t), impl=impl),
                             causal, **tol)
  ones = BlockMask(16, np.ones((4, 4), bool))
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=ones, impl=impl), causal, **tol)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=MoBA(16, 4), impl=impl), causal,
                             **tol)
  np.testing.assert_allclose(sparse_attention(q, k, v, pattern=MoBA(16, 9), impl=impl), causal,
                             **tol)


@pytest.mark.parametrize("pattern", [SlidingWindow(6), BlockMask(8, block_mask(4, local=2)),
                                     MoBA(8, 2)], ids=["window", "blockmask", "moba"])
def test_sparse_segments_and_alibi_match_reference(pattern):
  q, k, v = qkv(t=29)
  seg = packed_segments(2, 29, seed=4)
  slopes = jnp.asarray([0.3, 0.2, 0.1, 0.05])
  want = sparse_reference(q, k, v, pattern=pattern, segment_ids=seg, alibi_slopes=slopes)
  got = sparse_blockwise(q, k, v, pattern=pattern, segment_ids=seg, alibi_slopes=slopes)
  np.testing.assert_allclose(got, want, atol=1e-12)
  if not isinstance(pattern, MoBA):
    allowed = lambda b, h, t, s: (seg[b, t] == seg[b, s]) and bool(
        np.asarray(sparse_pattern_token_mask(pattern, 29))[t, s])
    np.testing.assert_allclose(got, naive.softmax_attention(q, k, v, allowed,
                                                            alibi=np.asarray(slopes)),
                               atol=1e-12)


def sparse_pattern_token_mask(pattern, t):
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  if isinstance(pattern, SlidingWindow):
    return (i - j < pattern.window)
  return pattern.array[i // pattern.block_size, j // pattern.block_size]


def test_moba_routing_ignores_other_documents():
  """With packed documents, a document's routing and output do not depend on the others."""
  q, k, v = qkv(b=1, t=40, seed=9)
  seg = jnp.asarray([[1] * 13 + [2] * 27], jnp.int32)
  out = sparse_attention(q, k, v, pattern=MoBA(8, 2), segment_ids=seg)
  r = np.random.default_rng(1)
  k2 = k.at[:, :13].set(jnp.asarray(r.normal(size=(1, 13, 2, 8))) * 5)
  v2 = v.at[:, :13].set(jnp.asarray(r.normal(size=(1, 13, 2, 8))))
  out2 = sparse_attention(q, k2, v2, pattern=MoBA(8, 2), segment_ids=seg)
  np.testing.assert_allclose(out2[:, 13:], out[:, 13:], atol=1e-12)


def test_block_lists_visit_only_kept_blocks():
  _, idx, valid = block_lists(SlidingWindow(16), 128, 128, block_size=16)
  counts = valid.sum(axis=1)
  assert counts.tolist() == [1] + [2] * 7  # the own block and the one before
  _, idx, valid = block_lists(BlockMask(16, block_mask(8, local=1, global_blocks=1)), 128, 128)
  assert valid.sum() == 8 + 7  # diagonal + sink column below it


@pytest.mark.parametrize("pattern", [SlidingWindow(5), BlockMask(4, block_mask(3, local=2)),
                                     MoBA(4, 2)], ids=["window", "blockmask", "moba"])
def test_sparse_gradients_match_finite_differences(pattern):
  q, k, v = qkv(b=1, t=11, hq=2, hkv=1, d=4)
  for fn in (sparse_reference, sparse_blockwise):
    check_grads(lambda q, k, v: fn(q, k, v, pattern=pattern), (q, k, v), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


# ---- bad inputs ------------------------------------------------------------------------------

def test_bad_shapes_and_values_fail_in_one_line():
  q, k, v = qkv(hq=3, hkv=2)
  with pytest.raises(ValueError, match="not a multiple"):
    blockwise_attention(q, k, v)
  q, k, v = qkv()
  with pytest.raises(ValueError, match="impl='magic'"):
    blockwise_attention(q, k, v, impl="magic")
  with pytest.raises(ValueError, match="feature_map='cosine'"):
    linear_attention(q, k, v, feature_map="cosine")
  with pytest.raises(ValueError, match=r"decay\(5,\)"):
    linear_attention(q, k, v, decay=jnp.zeros((5,)))
  with pytest.raises(ValueError, match="does not fit"):
    sparse_attention(q, k, v, pattern=BlockMask(8, np.ones((2, 2), bool)))
  with pytest.raises(ValueError, match="window=0"):
    SlidingWindow(0)
  with pytest.raises(ValueError, match="causal only"):
    sparse_attention(q, k, v, pattern=MoBA(8, 2), causal=False)
