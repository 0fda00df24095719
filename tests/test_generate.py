"""Generation: prefill + decode with each mixer's cache equals the full forward pass, for every
kind in the registry; sampling keeps to its filtered set; the command's bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import generate as gen_lib
from lmtrain.model import mixers
from lmtrain.trainer import build_model
from tests.conftest import cli_args, run_module, small_config

# Small sizes so a prompt ends mid-chunk, mid-block and past the window.
PARITY_OPTIONS = {"sliding_window": {"window": 6}, "block_sparse": {"block_size": 4},
                  "moba": {"block_size": 4, "top_k": 2}}


def parity_config(variant):
  """configs/tiny.py:attention=VARIANT (a kind, or a ready variant such as fox_pro) at small
  sizes, with GQA."""
  kind = mixers.variants()[variant]["kind"]
  over = {f"model.attention.{kind}.{k}": v for k, v in PARITY_OPTIONS.get(kind, {}).items()}
  if "chunk_size" in mixers.get(kind).Options.config_fields():
    over[f"model.attention.{kind}.chunk_size"] = 8
  if "short_conv" in mixers.get(kind).Options.config_fields():
    over[f"model.attention.{kind}.short_conv"] = True  # the convolution's tail is cached too
  # GQA: 4 query heads on 2 key/value heads
  return small_config(f"attention={variant}", **{"model.num_heads": 4, "model.num_kv_heads": 2,
                                                 **over})


def scaled_params(init, scale=4.0):
  """Random weights scaled up so every layer's mixing matters to the logits."""
  params = jax.jit(init)(jax.random.key(1))
  return jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, params)


@pytest.mark.parametrize("kind", [*mixers.kinds(), "fox_pro"])
def test_prefill_and_decode_equal_the_full_forward(kind):
  """Every kind, including ones added later: logits of prefill + N decode steps equal one full
  forward pass over the same tokens (fp32, 1e-5), for right-padded prompts of different lengths
  (ending mid-chunk, mid-block and past the window) and GQA."""
  cfg = parity_config(kind)
  fns, init = build_model(cfg.model)
  params = scaled_params(init)
  rng = np.random.default_rng(0)
  lengths, new = [11, 5, 8], 9
  full = rng.integers(0, 256, size=(3, max(lengths) + new)).astype(np.int32)
  prompts = [full[b, :n] for b, n in enumerate(lengths)]
  # teacher forcing: decode the row's own next tokens, comparing logits at every step
  generator = gen_lib.Generator(cfg.model)
  out = generator.generate(params, prompts, max_new_tokens=new, return_logits=True)
  assert out.logits.shape == (3, new, cfg.model.vocab_size)
  # one forward over the rows, right-padded (a causal model never sees the padding)
  width = max(lengths) + new - 1
  rows = np.zeros((3, width), np.int32)
  seg = np.zeros((3, width), np.int32)
  for b, n in enumerate(lengths):
    rows[b, :n + new - 1] = np.concatenate([prompts[b], out.tokens[b][:-1]])
    seg[b, :n + new - 1] = 1
  logits = np.asarray(fns.apply(params, jnp.asarray(rows), jnp.asarray(seg)))
  for b, n in enumerate(lengths):
    want = logits[b, n - 1:n + new - 1]
    np.testing.assert_allclose(out.logits[b], want, atol=1e-5, rtol=1e-5, err_msg=kind)
  assert float(np.std(want)) > 0.1, "the test needs logits that depend on the tokens"


def test_greedy_is_deterministic_and_a_seed_reproduces_sampling():
  cfg = parity_config("softmax")
  _, init = build_model(cfg.model)
  params = scaled_params(init, 2.0)
  prompt = [np.arange(1, 9, dtype=np.int32)]
  g = gen_lib.Generator(cfg.model)
  a = g.generate(params, prompt, max_new_tokens=12).tokens[0]
  b = g.generate(params, prompt, max_new_tokens=12).tokens[0]
  np.testing.assert_array_equal(a, b)
  s1 = g.generate(params, prompt, max_new_tokens=12, temperature=1.0, seed=3).tokens[0]
  s2 = g.generate(params, prompt, max_new_tokens=12, temperature=1.0, seed=3).tokens[0]
  s3 = g.generate(params, prompt, max_new_tokens=12, temperature=1.0, seed=4).tokens[0]
  np.testing.assert_array_equal(s1, s2)
  assert not np.array_equal(s1, s3)


def test_top_k_and_top_p_never_emit_a_token_outside_the_kept_set():
  # probabilities 0.5, 0.25, 0.15, 0.06, 0.04 over tokens 3, 0, 4, 1, 2
  probs = np.array([0.25, 0.06, 0.04, 0.5, 0.15])
  logits = jnp.log(jnp.asarray(np.tile(probs, (4096, 1))))
  draw = lambda **kw: np.asarray(gen_lib.sample(logits, jax.random.key(0), temperature=1.0, **kw))
  assert set(draw(top_k=2).tolist()) == {3, 0}
  assert set(draw(top_p=0.7).tolist()) == {3, 0}  # 0.5 < 0.7 <= 0.75: two tokens
  assert set(draw(top_p=0.76).tolist()) == {3, 0, 4}
  assert set(draw(top_p=0.1).tolist()) == {3}  # the most likely token is always kept
  assert set(draw(top_k=4, top_p=0.95).tolist()) == {3, 0, 4, 1}  # p over the top 4
  assert set(draw(top_k=4, top_p=0.9).tolist()) == {3, 0, 4}
  counts = np.bincount(draw(top_k=2), minlength=5)
  assert abs(counts[3] / counts.sum() - 2 / 3) < 0.03  # renormalised over the kept set


def test_generation_limits_are_one_line_errors():
  cfg = parity_config("softmax")
  _, init = build_model(cfg.model)
  params = jax.jit(init)(jax.random.key(0))
  with pytest.raises(gen_lib.GenerateError, match="empty"):
    gen_lib.generate(params, cfg, [np.zeros(0, np.int32)], max_new_tokens=4)
  limit = gen_lib.max_context(cfg)
  with pytest.raises(gen_lib.GenerateError, match="more than this model is run at"):
    gen_lib.generate(params, cfg, [np.ones(limit, np.int32)], max_new_tokens=4)


def test_decode_cache_memory_is_flat_for_window_and_linear_kinds():
  """The constant-memory claim in bytes: the cache of softmax grows with the context, that of
  sliding_window and of the linear-family kinds does not."""
  from flax import nnx

  from lmtrain.model import Transformer
  for kind in mixers.kinds():
    cfg = parity_config(kind)
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    sizes = [sum(x.size * x.dtype.itemsize
                 for x in jax.tree.leaves(jax.eval_shape(lambda: model.init_cache(1, n))))
             for n in (64, 4096)]
    if mixers.get(kind).group == "linear" or kind == "sliding_window":
      assert sizes[0] == sizes[1], kind
    else:
      assert sizes[1] > sizes[0], kind


@pytest.mark.slow
def test_the_command_generates_and_rejects_bad_input(tmp_path):
  workdir = str(tmp_path / "run")
  args = cli_args(**{"train.steps": 6, "train.checkpoint_every": 6, "train.eval_every": 6})
  proc = run_module("lmtrain.train", args + ["--workdir", workdir])
  assert proc.returncode == 0, proc.stderr
  proc = run_module("lmtrain.generate", args + ["--workdir", workdir, "--prompt", "def ",
                                                "--max_new_tokens", "16", "--temperature", "0"])
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("def ")
  assert "prefill" in proc.stderr and "decode" in proc.stderr and "cache" in proc.stderr
  bad = [(["--prompt", ""], "empty"), (["--prompt", "x" * 20000], "more than this model"),
         (["--prompt", "x", "--config.model.num_layers=3"], "another model: model.num_layers")]
  for extra, needle in bad:
    proc = run_module("lmtrain.generate", args + ["--workdir", workdir, *extra])
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_niah_generate_mode_agrees_with_greedy_teacher_forcing():
  """eval.niah_mode=generate writes each answer with the cache; for greedy decoding a cell's
  accuracy must equal the teacher-forced one (a difference would be a cache bug)."""
  from lmtrain.evals.runner import EvalSuite
  cfg = small_config("attention=sliding_window", **{
      "eval.lengths": "128", "eval.niah_samples": 2, "eval.niah_depths": "0,1",
      "eval.niah_fillers": "synthetic", "eval.niah_mode": "generate",
      "model.attention.sliding_window.window": 32})
  fns, init = build_model(cfg.model)
  grids = EvalSuite(cfg, fns).niah(jax.jit(init)(jax.random.key(0)))["grids"]
  assert grids[0]["mode"] == "generate"
  assert grids[0]["accuracy"] == grids[0]["accuracy_teacher_forced"]
