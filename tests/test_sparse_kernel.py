"""Sparse attention on the Pallas TPU block-list kernel, in TPU interpret mode: forward and
gradients against the dense masked reference, and the tiles it visits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import BlockMask, MoBA, SlidingWindow, sparse_attention
from pallas_kernels.sparse import sparse_reference
from pallas_kernels.sparse.pallas_tpu import sparse_flash_tpu, visited_blocks
from tests.test_blockwise_kernel import inputs


def check_against_reference(pattern, q, k, v, seg, cot, *, causal=True, block=16, slopes=None):
  """Asserts forward, dq, dk and dv of the kernel equal the dense masked reference (with ALiBi
  slopes [Hq], when given)."""
  interp = pltpu.InterpretParams(uninitialized_memory="nan")

  def kernel(q, k, v):
    out = sparse_flash_tpu(q, k, v, pattern=pattern, causal=causal, segment_ids=seg,
                           interpret=interp, block=block, alibi_slopes=slopes)
    return jnp.sum(out * cot), out

  def reference(q, k, v):
    out = sparse_reference(q, k, v, pattern=pattern, causal=causal, segment_ids=seg,
                           alibi_slopes=slopes)
    return jnp.sum(out * cot), out

  (_, o1), g1 = jax.value_and_grad(kernel, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, o2), g2 = jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (o1, *g1), (o2, *g2)):
    assert np.all(np.isfinite(got)), name
    scale = max(float(jnp.max(jnp.abs(want))), 1.0)  # an all-zero gradient (window 1) has no scale
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=1e-4,
                               err_msg=name)


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(17, 70), window=st.sampled_from([1, 5, 16, 23, 100]),
       causal=st.booleans(), segments=st.booleans(), seed=st.integers(0, 99))
def test_sliding_window_windows_below_and_above_the_block(t, window, causal, segments, seed):
  q, k, v, seg, cot = inputs(seed, 1, t, 4, 2, 64, segments)
  check_against_reference(SlidingWindow(window), q, k, v, seg, cot, causal=causal, block=16)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(nb=st.integers(2, 5), tail=st.integers(0, 7), seed=st.integers(0, 99))
def test_random_block_masks_with_a_ragged_tail(nb, tail, seed):
  t = (nb - 1) * 8 + 1 + tail  # nb blocks of 8, the last one partial
  mask = np.random.default_rng(seed).random((nb, nb)) < 0.5
  q, k, v, seg, cot = inputs(seed, 1, t, 2, 1, 64, True)
  check_against_reference(BlockMask(8, mask), q, k, v, seg, cot)


@pytest.mark.parametrize("pattern,t,expected", [
    (SlidingWindow(16), 128, 8 + 7),  # the diagonal tile and the one before it
    (SlidingWindow(1), 128, 8),  # the diagonal only
    (SlidingWindow(1000), 128, 8 * 9 // 2),  # every causal tile
    (BlockMask(16, np.eye(8, dtype=bool) | (np.arange(8)[None, :] == 0)), 128, 8 + 7),
])
def test_visited_tiles_equal_the_patterns_count(pattern, t, expected):
  assert visited_blocks(pattern, t, block=16) == expected


def test_through_the_api():
  q, k, v, seg, _ = inputs(0, 1, 33, 2, 2, 64, False)
  for pattern in (SlidingWindow(9), MoBA(8, 2)):
    got = sparse_attention(q, k, v, pattern=pattern, impl="interpret")
    np.testing.assert_allclose(got, sparse_reference(q, k, v, pattern=pattern), atol=1e-5)


@pytest.mark.parametrize("pattern", [SlidingWindow(23),
                                     BlockMask(16, ~np.eye(3, k=-1, dtype=bool))],
                         ids=["window", "blockmask"])
def test_alibi_on_the_kernel(pattern):
  """ALiBi runs on the window and block-mask kernels as constant forget gates (slope 8: whole
  tiles underflow); MoBA's kernels refuse it."""
  q, k, v, seg, cot = inputs(21, 1, 45, 2, 1, 64, True)
  slopes = jnp.asarray([8.0, 1 / 16], jnp.float32)
  check_against_reference(pattern, q, k, v, seg, cot, block=16, slopes=slopes)
  with pytest.raises(ValueError, match="MoBA kernels do not take alibi_slopes"):
    sparse_attention(q, k, v, pattern=MoBA(8, 2), alibi_slopes=slopes, impl="interpret")


# ---- MoBA ----------------------------------------------------------------------------------------

@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(17, 50), moba_block=st.sampled_from([8, 16, 32]),
       top_k=st.sampled_from([1, 2, 3, 12]), segments=st.booleans(),
       ratio=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
def test_moba_matches_reference(t, moba_block, top_k, segments, ratio, seed):
  """top_k from 1 (own block only) to more than the number of blocks; T not a multiple of the
  block; own-block tiles of 8 so that a MoBA block spans several tiles."""
  hkv = 2 if ratio < 4 else 1
  q, k, v, seg, cot = inputs(seed, 1, t, hkv * ratio, hkv, 64, segments)
  check_against_reference(MoBA(moba_block, top_k), q, k, v, seg, cot, block=8)


def _work_tiles_needed(routes, num_blocks, bq):
  """Independent count (loops): for each batch, head and block, the (token, route) pairs that
  chose it, in tiles of bq."""
  routes = np.asarray(routes)
  total = 0
  for b in range(routes.shape[0]):
    for h in range(routes.shape[2]):
      chosen = routes[b, :, h].ravel()
      total += sum(-(-int(np.sum(chosen == j)) // bq) for j in range(num_blocks))
  return total


@pytest.mark.parametrize("agree", [False, True])
def test_moba_computes_only_the_routed_pairs(agree):
  """The routed kernel's work tiles equal an independent count of (token, block) pairs in
  tiles of bq, whatever the routing: random (every token differs) or agreeing (every query
  prefers block 0, and tokens of block 0 have no past block)."""
  from pallas_kernels.sparse.moba_tpu import moba_work_tiles
  from pallas_kernels.sparse.routing import moba_routing
  t, pattern, bq = 256, MoBA(32, 2), 16
  q, k, v, _, _ = inputs(5, 1, t, 2, 1, 64, False)
  if agree:
    direction = jnp.ones((64,)) / 8.0
    q = q + 4.0 * direction
    k = k.at[:, :32].add(4.0 * direction)
  routes = moba_routing(q, k, block_size=32, top_k=2)
  work, grid = moba_work_tiles(q, k, pattern, bq=bq)
  assert work == _work_tiles_needed(routes, t // 32, bq)
  assert grid == 2 * (t * 1 // bq + t // 32)  # the static bound, per head
  if agree:
    assert work == 2 * (t - 32) // bq
