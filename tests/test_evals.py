"""Evals: known answers, windowing, NIAH placement, MQAR data, and the end-to-end path."""
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.data import ByteTokenizer
from lmtrain.data.mqar import mqar_row
from lmtrain.evals import needle
from lmtrain.evals.mqar import mqar_grid
from lmtrain.evals.perplexity import (disjoint_windows, evaluate_rows, heldout_stream,
                                      perplexity, sliding_windows)
from lmtrain.evals.scoring import Scorer
from tests.conftest import cli_args, read_scalars, run_module, small_config

TOK = ByteTokenizer()


def uniform_scorer(vocab):
  return Scorer(lambda params, tokens, seg: jnp.zeros(tokens.shape + (vocab,)))


class PositionScorer:
  """NLL of a target = 0.01 * (its index in the row + 1): different at every window position."""

  def score(self, params, inputs, targets, seg):
    return 0.01 * (np.arange(inputs.shape[1])[None, :] + 1.0) * np.ones(inputs.shape), None


def copy_model_scorer():
  """A constructed induction model: predicts the token that followed the longest earlier match
  of the current suffix. It never trains; it retrieves anything it has seen."""
  def apply(params, tokens, seg):
    toks = np.asarray(tokens)
    b, t = toks.shape
    logits = np.zeros((b, t, 258), np.float32)
    for r in range(b):
      row = toks[r]
      for i in range(t):
        best_len, best_j = 0, -1
        for j in range(i):
          n = 0
          while n <= j and row[j - n] == row[i - n] and n < 32:
            n += 1
          if n >= best_len and n > 0:
            best_len, best_j = n, j
        if best_j >= 0:
          logits[r, i, row[best_j + 1]] = 10.0
    return jnp.asarray(logits)
  scorer = Scorer(apply, jit=False)
  scorer.apply = apply  # for greedy_generate_fn
  return scorer


# ---- known answers ---------------------------------------------------------------------------

def test_uniform_logits_give_perplexity_vocab_size():
  cfg = small_config()
  for vocab in (258, 300):  # every id the stream holds (bytes, BOS, EOS) is in the vocabulary
    r = perplexity(uniform_scorer(vocab), None, cfg, window=64, stride=16, max_tokens=3000,
                   batch_size=8)
    for mode in ("disjoint", "sliding"):
      assert r[mode]["perplexity"] == pytest.approx(vocab, rel=1e-6)  # fp32 logits
      assert r[mode]["nats_per_token"] == pytest.approx(math.log(vocab), rel=1e-7)


def test_uniform_byte_model_has_8_bits_per_byte_on_pure_bytes():
  text = "hello, world! " * 20
  ids = TOK.encode(text)
  rows = disjoint_windows(ids, np.ones_like(ids), 16)
  totals = evaluate_rows(uniform_scorer(256), None, rows, TOK, batch_size=4)
  assert totals.summary()["bits_per_byte"] == pytest.approx(math.log2(256), rel=1e-7)


def test_bits_per_byte_by_hand_with_specials_and_multibyte_text():
  # two documents: "ab" and "é" (2 UTF-8 bytes); stream BOS a b EOS BOS c3 a9 EOS
  stream = np.asarray([256, 97, 98, 257, 256, 0xC3, 0xA9, 257], np.int32)
  seg = np.asarray([1, 1, 1, 1, 2, 2, 2, 2], np.int32)
  rows = disjoint_windows(stream, seg, 7)
  # scored targets: a, b, EOS, (not the next BOS: another document), c3, a9, EOS = 6 tokens
  totals = evaluate_rows(uniform_scorer(258), None, rows, TOK, batch_size=1)
  assert totals.tokens == 6 and totals.bytes == 4
  # 6 tokens of log2(258) bits each, over 4 bytes of text
  assert totals.summary()["bits_per_byte"] == pytest.approx(6 * math.log2(258) / 4, rel=1e-7)


def test_copy_model_scores_100_percent_on_passkey():
  grid = needle.passkey_grid(copy_model_scorer(), None, TOK, lengths=[160, 256],
                             depths=[0.0, 0.5, 1.0], samples=2, filler="synthetic",
                             natural_text=None, seed=0, batch_tokens=1024)
  assert np.all(np.asarray(grid["accuracy"]) == 1.0)
  grid = needle.passkey_grid(uniform_scorer(258), None, TOK, lengths=[160], depths=[0.5],
                             samples=2, filler="synthetic", natural_text=None, seed=0,
                             batch_tokens=1024)
  assert grid["accuracy"] == [[0.0]]
  assert grid["answer_nll"][0][0] == pytest.approx(5 * math.log(258))


def greedy_generate_fn(scorer, vocab):
  """generate_fn for passkey_grid by re-running a scorer's full forward per new token."""
  def fn(prompts, max_new_tokens):
    out = []
    for p in prompts:
      seq = list(p)
      for _ in range(max_new_tokens):
        logits = np.asarray(scorer.apply(None, np.asarray([seq]), None))[0, -1, :vocab]
        seq.append(int(np.argmax(logits)))
      out.append(np.asarray(seq[len(p):]))
    return out
  return fn


def test_generated_answers_are_scored_by_exact_match():
  copy = copy_model_scorer()
  grid = needle.passkey_grid(copy, None, TOK, lengths=[160], depths=[0.0, 1.0], samples=2,
                             filler="synthetic", natural_text=None, seed=0, batch_tokens=1024,
                             generate_fn=greedy_generate_fn(copy, 258))
  assert grid["mode"] == "generate"
  assert grid["accuracy"] == grid["accuracy_teacher_forced"] == [[1.0], [1.0]]
  # a generator that writes the answer off by one digit scores 0 whatever teacher forcing says
  def off_by_one(prompts, n):
    return [np.asarray(g) + 1 for g in greedy_generate_fn(copy, 258)(prompts, n)]
  grid = needle.passkey_grid(copy, None, TOK, lengths=[160], depths=[0.5], samples=2,
                             filler="synthetic", natural_text=None, seed=0, batch_tokens=1024,
                             generate_fn=off_by_one)
  assert grid["accuracy"] == [[0.0]] and grid["accuracy_teacher_forced"] == [[1.0]]


# ---- windows ---------------------------------------------------------------------------------

def test_sliding_with_stride_equal_to_window_equals_disjoint():
  cfg = small_config()
  tokens, seg = heldout_stream(cfg, 5000)
  a = disjoint_windows(tokens, seg, 64)
  b = sliding_windows(tokens, seg, 64, 64)
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("stride", [16, 24, 64])
def test_sliding_scores_every_target_once_and_weights_by_token(stride):
  tokens = np.arange(1000, dtype=np.int32)  # unique values: a target names its position
  seg = np.ones_like(tokens)
  rows = sliding_windows(tokens, seg, 64, stride)
  scored = np.concatenate([targets[score] for _, targets, _, score in rows])
  limit = (999 // 64) * 64
  assert sorted(scored.tolist()) == list(range(1, limit + 1))  # each once, as disjoint does
  assert all(np.all(r[3][-stride:]) for r in rows[1:-1])  # a middle window scores its tail
  per_token = np.concatenate([0.01 * (np.flatnonzero(r[3]) + 1.0) for r in rows])
  tokenizer = type("T", (), {"num_bytes": staticmethod(lambda ids: int(np.size(ids)))})
  totals = evaluate_rows(PositionScorer(), None, rows, tokenizer, batch_size=4)
  assert totals.nll / totals.tokens == pytest.approx(per_token.mean())  # token-weighted
  if stride < 64:
    window_means = [np.mean(0.01 * (np.flatnonzero(r[3]) + 1.0)) for r in rows]
    assert totals.nll / totals.tokens != pytest.approx(np.mean(window_means))


# ---- NIAH placement --------------------------------------------------------------------------

@pytest.mark.parametrize("length", [128, 300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_sits_at_the_requested_depth_and_context_has_the_length(length, depth):
  filler = TOK.encode(needle.SYNTHETIC_FILLER)
  s = needle.make_sample(TOK, length=length, depth=depth, key=48213, filler_ids=filler)
  assert len(s.tokens) == length + 1  # inputs tokens[:-1] are exactly `length`
  text = TOK.decode(s.tokens)
  assert TOK.decode(s.tokens[s.needle_start:]).startswith("The pass key is 48213.")
  assert abs((s.needle_start - 1) - depth * s.filler_tokens) <= 0.5  # within a token
  assert TOK.decode(s.tokens[1:][s.answer_slice]) == "48213"
  assert text.endswith("What is the pass key? The pass key is 48213")


def test_effective_length_is_the_longest_that_stays_above_threshold():
  assert needle.effective_length([128, 256, 512, 1024], [1.0, 0.9, 0.2, 0.8], 0.5) == 256
  assert needle.effective_length([128, 256], [0.1, 1.0], 0.5) == 0
  assert needle.effective_length([256, 128], [1.0, 1.0], 0.5) == 256


# ---- MQAR ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,pairs,vocab", [(64, 4, 256), (64, 16, 256), (256, 64, 256),
                                                (32, 8, 20)])
def test_mqar_rows_follow_zoology(seq_len, pairs, vocab):
  """Zoology's multiquery_ar: keys without replacement from [1, V/2), values without replacement
  from [V/2, V), k v pairs first, each key queried once at an even offset after them, the value
  predicted while reading the key, everything else random."""
  half = vocab // 2
  for index in range(5):
    r = mqar_row(3, index, seq_len=seq_len, num_pairs=pairs, vocab_size=vocab)
    tokens, targets, mask = r["tokens"], r["targets"], r["loss_mask"]
    assert tokens.shape == (seq_len,) and tokens.min() >= 0 and tokens.max() < vocab
    keys, values = tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs and keys.min() >= 1 and keys.max() < half
    assert len(set(values.tolist())) == pairs and values.min() >= half
    table = dict(zip(keys.tolist(), values.tolist()))
    queries = np.flatnonzero(mask)
    assert len(queries) == pairs and np.all(queries >= 2 * pairs)
    assert np.all((queries - 2 * pairs) % 2 == 0)
    assert sorted(tokens[queries].tolist()) == sorted(keys.tolist())  # every key once
    for p in queries:  # the target is the queried key's value, scored at the key itself
      assert targets[p] == table[int(tokens[p])]
      assert r["query_distance"][p] == p - 2 * keys.tolist().index(int(tokens[p]))


def test_mqar_gaps_follow_the_power_law_and_filler_is_random():
  from lmtrain.data.mqar import gap_probabilities
  seq_len, pairs = 64, 4
  space = (seq_len - 2 * pairs) // 2
  first_gap, zeros = 0, 0
  n = 2000
  for index in range(n):
    r = mqar_row(11, index, seq_len=seq_len, num_pairs=pairs)
    gaps = (np.flatnonzero(r["loss_mask"]) - 2 * pairs) // 2
    first_gap += int(0 in gaps)
    zeros += int(np.sum(r["tokens"] == 0))
  # P(gap 0 among the 4 drawn without replacement) from the power law, by simulation
  rng = np.random.default_rng(0)
  p = gap_probabilities(space, 0.01)
  want = np.mean([0 in rng.choice(space, 4, replace=False, p=p) for _ in range(4000)])
  assert abs(first_gap / n - want) < 0.05 and want > 4 / space * 2  # skewed towards 0
  assert zeros / (n * seq_len) < 0.01  # Zoology's blanks are replaced by random ids
  plain = mqar_row(1, 0, seq_len=seq_len, num_pairs=pairs, random_non_queries=False)
  assert np.sum(plain["tokens"] == 0) == seq_len - 3 * pairs  # pairs, then one query each


def test_mqar_eval_of_a_perfect_recaller_is_one():
  class Oracle:
    def score(self, params, tokens, targets, seg):
      return np.zeros(tokens.shape), np.ones(tokens.shape, bool)
  r = mqar_grid(Oracle(), None, pairs=[2, 8, 64], lengths=[32, 64], samples=4, batch_tokens=256)
  assert r["accuracy"] == [[1.0, 1.0], [1.0, 1.0], [None, None]]
  assert r["mean_accuracy"] == 1.0
  assert r["by_distance"] and all(b["accuracy"] == 1.0 for b in r["by_distance"])


def test_mqar_source_trains_through_the_pipeline():
  cfg = small_config(**{"data.source": "mqar", "data.mqar_num_pairs": "4"})
  from lmtrain.data import train_dataset
  batch = next(iter(train_dataset(cfg)))
  assert batch["tokens"].shape == (8, 64) and batch["loss_mask"].sum() == 8 * 4


def test_mqar_batches_are_the_seeded_rows_disjoint_across_hosts_and_resume_exactly():
  """Batch j of host p is rows (j * hosts + p) * B + r, each exactly mqar_row(seed, row): what a
  run sees depends on (seed, row) only, hosts never share a row, and a restored iterator
  continues with the next batch."""
  from lmtrain.data.mqar import mqar_dataset
  kw = dict(seed=5, seq_len=32, num_pairs="2,4", batch_size=3)
  hosts = [list(mqar_dataset(**kw, process_index=p, process_count=2, num_rows=24))
           for p in range(2)]
  assert [len(h) for h in hosts] == [4, 4]
  seen = set()
  for p, batches in enumerate(hosts):
    for j, batch in enumerate(batches):
      for r in range(3):
        row = (j * 2 + p) * 3 + r
        pairs = int(batch["loss_mask"][r].sum())
        want = mqar_row(5, row, seq_len=32, num_pairs=pairs)
        for key in ("tokens", "targets", "loss_mask"):
          np.testing.assert_array_equal(batch[key][r], want[key])
        seen.add(tuple(batch["tokens"][r]))
  assert len(seen) == 24
  it = iter(mqar_dataset(**kw))
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = iter(mqar_dataset(**kw))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])


# ---- end to end ------------------------------------------------------------------------------

EVAL_SMALL = {"eval.lengths": "128,192", "eval.niah_samples": 1, "eval.niah_depths": "0,1",
              "eval.ppl_tokens": 2048, "eval.extrapolation_tokens": 512,
              "eval.extrapolation_factors": "0.5,1,2", "eval.mqar_samples": 4,
              "eval.mqar_pairs": "2,4", "eval.batch_tokens": 2048}


@pytest.mark.slow
def test_train_evaluate_compare_and_notebook(tmp_path):
  runs = []
  for kind in ("softmax", "linear"):
    workdir = str(tmp_path / kind)
    args = cli_args(**{"train.steps": 10, "train.eval_every": 10, "eval.evals": "ppl,niah",
                       "train.checkpoint_every": 10, **EVAL_SMALL})
    args[1] = f"configs/tiny.py:attention={kind}"
    proc = run_module("lmtrain.train", args + ["--workdir", workdir])
    assert proc.returncode == 0, proc.stderr
    proc = run_module("lmtrain.evaluate", args + ["--workdir", workdir])
    assert proc.returncode == 0, proc.stderr
    assert "ppl: disjoint" in proc.stdout and "extrapolation: L=32" in proc.stdout
    runs.append(workdir)
    scalars = read_scalars(workdir)
    assert "eval_ppl/disjoint/bits_per_byte" in scalars
    assert "niah/synthetic/effective_length" in scalars
    assert "extrapolation/ppl_L128" in scalars and "mqar/mean_accuracy" in scalars
    for name in ("ppl", "niah", "extrapolation", "mqar"):
      with open(os.path.join(workdir, "evals", f"{name}.json")) as f:
        assert json.load(f)["step"] == 10
  from tensorboard.backend.event_processing import event_accumulator
  events = [os.path.join(runs[0], f) for f in os.listdir(runs[0]) if "tfevents" in f]
  images = set()
  for path in events:
    acc = event_accumulator.EventAccumulator(path, size_guidance={"images": 0})
    acc.Reload()
    images |= set(acc.Tags()["images"])
  assert {"niah/synthetic/heatmap", "niah/natural/heatmap", "mqar/accuracy",
          "extrapolation/ppl_vs_length"} <= images
  out = str(tmp_path / "comparison")
  proc = run_module("lmtrain.compare", runs + ["--out", out])
  assert proc.returncode == 0, proc.stderr
  table = open(os.path.join(out, "comparison.md")).read()
  assert "| softmax | softmax |" in table and "| linear | linear |" in table
  for png in ("ppl_vs_length.png", "niah.png", "mqar.png", "loss_by_position.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  # the notebook reads the comparison and plots it
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "notebooks",
                                  "compare_attention.ipynb"), as_version=4)
  os.environ["LMTRAIN_COMPARISON"] = out
  NotebookClient(nb, timeout=300, kernel_name="python3").execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert any("softmax" in str(o.get("data", {}).get("text/plain", "")) or
             "softmax" in str(o.get("text", "")) for o in outputs)


def test_evaluate_without_checkpoint_fails_in_one_line(tmp_path):
  proc = run_module("lmtrain.evaluate", cli_args() + ["--workdir", str(tmp_path)])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"lmtrain: error: no checkpoints in {tmp_path} (train first: python -m lmtrain.train "
      f"--config ... --workdir {tmp_path})"]
