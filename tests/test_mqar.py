"""Every attention kind learns to use its context: a short training on Zoology's MQAR must reach
a recall that no model without token mixing can (an attention-ablated control, which is a
bigram model: each position sees only its own token), whatever the kind. A kind whose mixer
outputs zeros, or ignores the past, fails here."""
import jax.numpy as jnp
import pytest

from lmtrain.model import mixers
from lmtrain.mqar_check import mqar_config, train_recall

# 2 pairs at sequence 16 over a 64-token vocabulary: reading the context gives at least the
# "bag of values" plateau (1/2), chance without it is 1/32.
SMALL = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
         "model.num_kv_heads": 2, "model.mlp_dim": 32, "data.seq_len": 16, "data.batch_size": 32,
         "data.mqar_num_pairs": "2", "data.mqar_vocab_size": 64, "eval.mqar_pairs": "2",
         "eval.mqar_samples": 256, "train.steps": 250, "train.lr": 1e-2,
         "train.warmup_steps": 20}
THRESHOLD = 0.25


def small(kind):
  over = dict(SMALL)
  fields = mixers.get(kind).Options.config_fields()
  if "chunk_size" in fields:
    over[f"model.attention.{kind}.chunk_size"] = 8
  if kind == "sliding_window":
    over["model.attention.sliding_window.window"] = 16  # the whole row: a kind, not a control
  return mqar_config(kind, **over)


@pytest.mark.parametrize("kind", mixers.kinds())
def test_each_kind_recalls_beyond_what_a_model_without_attention_can(kind):
  recall = train_recall(small(kind))["accuracy"][2]
  assert recall > THRESHOLD, (kind, recall)


def test_the_attention_ablated_control_stays_below_the_threshold(monkeypatch):
  """The same model and training with the mixer's output zeroed: the threshold above is out of
  its reach, so passing it means the kind's attention carries the recall."""
  softmax = mixers.get("softmax")
  monkeypatch.setattr(softmax, "__call__", lambda self, x, *a: jnp.zeros_like(x))
  recall = train_recall(small("softmax"))["accuracy"][2]
  assert recall < THRESHOLD / 2, recall


def _result(accuracy, far=None):
  by_distance = [] if far is None else [{"bucket": 5, "queries": 10, "accuracy": far}]
  return {"accuracy": dict(zip((2, 4, 8), accuracy)), "by_distance": by_distance}


def test_mqar_check_verdicts_follow_the_claims_not_the_noise():
  """The check's verdicts on made-up recalls: each claim holds or fails on its numbers, in the
  check that makes it; a delta rule that ties simple GLA within the eval's noise is not
  'clearly better'."""
  from lmtrain.mqar_check import verdicts
  zoology = {"softmax": _result((0.99, 0.97, 0.96)), "fox": _result((0.40, 0.25, 0.13)),
             "fox_pro": _result((0.98, 0.96, 0.93)), "linear": _result((0.40, 0.25, 0.13)),
             "gla": _result((0.99, 0.98, 0.98)),
             "sliding_window": _result((0.35, 0.2, 0.13), far=0.01)}
  got = {claim.split(" (")[0]: ok for claim, ok, _ in verdicts("zoology", zoology, 1 / 128)}
  assert got["softmax recalls >= 95% at every pair count"]
  assert got["linear recalls less than softmax, and less as pairs grow"]
  assert not got["gla recalls less than softmax, and less as pairs grow"]
  assert got["sliding_window"]
  assert got["fox_pro keeps softmax's recall"] and not got["fox keeps softmax's recall"]
  assert not any("clearly better" in claim for claim in got)  # the state check's claim
  zoology["softmax"] = _result((0.99, 0.97, 0.94))
  assert not verdicts("zoology", zoology, 1 / 128)[0][1]
  state = {"linear": _result((0.40, 0.25, 0.13)), "simple_gla": _result((0.94, 0.88, 0.72)),
           "deltanet": _result((1.0, 0.99, 0.97)), "gated_deltanet": _result((1.0, 1.0, 0.75))}
  got = {claim.split(" (")[0]: ok for claim, ok, _ in verdicts("state", state, 1 / 128)}
  assert got["deltanet recalls clearly better than linear"]
  assert got["deltanet recalls clearly better than simple_gla"]
  assert not got["gated_deltanet recalls clearly better than simple_gla"]  # 0.75 vs 0.72
  assert got["simple_gla recalls less as pairs grow"]
  assert "deltanet recalls less as pairs grow" not in got
