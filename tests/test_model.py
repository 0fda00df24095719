"""The Transformer: shapes, causality, packed-document isolation, GQA, tying, positions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.model import Transformer
from lmtrain.model.positions import apply_rope, positions_from_segments
from tests.conftest import small_config

jax.config.update("jax_enable_x64", False)


def make_model(arg=None, **overrides):
  cfg = small_config(arg, **overrides)
  return Transformer(cfg.model, rngs=nnx.Rngs(0)), cfg


def random_tokens(b, t, seed=0, vocab=256):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(b, t)), jnp.int32)


def test_logits_shape_and_dtype():
  model, cfg = make_model()
  logits = model(random_tokens(2, 33))
  assert logits.shape == (2, 33, cfg.model.vocab_size)
  assert logits.dtype == jnp.float32
  # At initialisation the model is close to uniform: loss ~ ln(vocab).
  assert abs(float(jnp.std(logits))) < 1.0


def test_bf16_compute_keeps_fp32_params():
  model, _ = make_model(**{"model.dtype": "bfloat16"})
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert model(random_tokens(1, 8)).dtype == jnp.float32


def test_causal_changing_token_p_leaves_earlier_logits_bit_identical():
  model, _ = make_model()
  tokens = random_tokens(2, 40)
  base = model(tokens)
  for p in (0, 17, 39):
    changed = tokens.at[:, p].set((tokens[:, p] + 1) % 256)
    out = model(changed)
    np.testing.assert_array_equal(np.asarray(out[:, :p]), np.asarray(base[:, :p]))
    assert not np.array_equal(np.asarray(out[:, p:]), np.asarray(base[:, p:]))


def test_packed_documents_do_not_see_each_other():
  model, _ = make_model()
  a, b = random_tokens(1, 20, seed=1), random_tokens(1, 28, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 20 + [2] * 28], jnp.int32)
  out = model(packed, seg)
  alone_a = model(a, jnp.ones_like(a))
  alone_b = model(b, jnp.ones_like(b))
  np.testing.assert_allclose(out[:, :20], alone_a, atol=2e-5)
  np.testing.assert_allclose(out[:, 20:], alone_b, atol=2e-5)  # positions restart per segment
  other = jnp.concatenate([random_tokens(1, 20, seed=3), b], axis=1)
  np.testing.assert_allclose(model(other, seg)[:, 20:], out[:, 20:], atol=2e-5)


def test_positions_from_segments_restart():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_rope_is_relative():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  dot = lambda i, j: float(jnp.sum(apply_rope(q, jnp.asarray([[i]])) * apply_rope(
      k, jnp.asarray([[j]]))))
  assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-5)
  assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-3)


def test_tied_embeddings_have_no_output_matrix():
  tied, _ = make_model(**{"model.tie_embeddings": True})
  untied, _ = make_model()
  n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n(untied) - n(tied) == 64 * 258
  assert tied(random_tokens(1, 5)).shape == (1, 5, 258)


def test_gqa_shapes_and_mqa():
  model, _ = make_model(**{"model.num_heads": 4, "model.num_kv_heads": 2})
  blk = model.blocks[0].attn
  assert blk.q_proj.kernel.shape == (64, 4, 16)
  assert blk.k_proj.kernel.shape == (64, 2, 16)
  mqa, _ = make_model(**{"model.num_heads": 4, "model.num_kv_heads": 1})
  assert mqa(random_tokens(1, 9)).shape == (1, 9, 258)


def test_parameters_carry_logical_axes():
  from lmtrain.trainer import build_model
  fns, _ = build_model(small_config().model)
  axes = fns.logical_axes
  assert axes["embed"]["embedding"] == ("vocab", "embed")
  assert axes["blocks"][0]["attn"]["q_proj"]["kernel"] == ("embed", "heads", "head_dim")
  assert axes["blocks"][1]["attn"]["k_proj"]["kernel"] == ("embed", "kv_heads", "head_dim")
  assert axes["blocks"][0]["mlp"]["down"]["kernel"] == ("mlp", "embed")
  assert axes["unembed"]["kernel"] == ("embed", "vocab")
