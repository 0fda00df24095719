"""A result is attributable to its model, config and code: checkpoints carry their resolved
config and run metadata; another model is refused (or recorded, when allowed); compare shows
what differs; eval settings that cannot run fail before compiling."""
import json
import os

import pytest

from lmtrain import compare, config as config_lib, provenance
from lmtrain.checkpoint import Checkpointer
from lmtrain.train import CheckpointMismatch, train
from tests.conftest import cli_args, run_module, small_config

STEPS = {"train.steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4,
         "train.warmup_steps": 1}


def one_line(proc):
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_code_version_and_metadata():
  v = provenance.code_version()
  assert len(v["source_hash"]) == 16 and v["source_hash"] == provenance.source_hash()
  m = provenance.run_metadata()
  assert {"jax", "flax", "backend", "device_kind", "git_commit", "git_dirty"} <= set(m)


def test_differences_name_every_differing_model_field():
  a = small_config().to_dict()
  b = small_config("attention=moba").to_dict()
  diffs = provenance.differences(a, b)
  fields = [d[0] for d in diffs]
  assert "model.attention.kind" in fields and "model.attention.moba.top_k" in fields
  c = small_config(**{"model.attention.impl": "xla"}).to_dict()
  assert provenance.differences(a, c) == []  # how it is computed, not what


@pytest.mark.slow
def test_another_attention_kind_is_refused_or_recorded(tmp_path):
  workdir = str(tmp_path / "softmax")
  train(small_config(**STEPS), workdir)
  saved = Checkpointer(workdir, keep=1).saved_config(4)
  assert saved["config"]["model"]["attention"]["kind"] == "softmax"
  assert saved["run"]["source_hash"] == provenance.source_hash()
  # resuming under another kind: one line naming the fields, nothing trained
  with pytest.raises(CheckpointMismatch, match="model.attention.kind: 'softmax'"):
    train(small_config("attention=moba", **{**STEPS, "train.steps": 6}), workdir)
  args = cli_args(**{**STEPS, "eval.ppl_tokens": 512}) + ["--workdir", workdir, "--evals", "ppl"]
  moba = [a.replace("configs/tiny.py", "configs/tiny.py:attention=moba") for a in args]
  proc = run_module("lmtrain.evaluate", moba)
  assert proc.returncode == 2
  line = one_line(proc)
  assert "model.attention.kind: 'softmax' (checkpoint) vs 'moba' (--config)" in line
  assert "--allow_config_mismatch" in line
  assert not os.path.exists(os.path.join(workdir, "evals"))
  proc = run_module("lmtrain.evaluate", moba + ["--allow_config_mismatch"])
  assert proc.returncode == 0, proc.stderr
  other = os.path.join(workdir, "evals", "other-configs")  # never over the run's own results
  [digest] = os.listdir(other)
  result = json.load(open(os.path.join(other, digest, "ppl.json")))
  assert result["config"]["model"]["attention"]["kind"] == "moba"
  assert result["checkpoint_config"]["model"]["attention"]["kind"] == "softmax"
  assert result["run"]["source_hash"] == provenance.source_hash()
  assert not os.path.exists(os.path.join(workdir, "evals", "ppl.json"))
  # without --config, the checkpoint's own config is evaluated
  proc = run_module("lmtrain.evaluate", ["--workdir", workdir, "--evals", "ppl"])
  assert proc.returncode == 0, proc.stderr
  result = json.load(open(os.path.join(workdir, "evals", "ppl.json")))
  assert result["config"]["model"]["attention"]["kind"] == "softmax"
  assert "checkpoint_config" not in result


def test_compare_shows_the_fields_that_differ_and_flags_other_code(tmp_path):
  runs = []
  for name, position, source in (("rope", "rope", "aaaa"), ("alibi", "alibi", "aaaa"),
                                 ("old", "rope", "bbbb")):
    cfg = small_config(**{"model.attention.softmax.position": position})
    d = tmp_path / name / "evals"
    d.mkdir(parents=True)
    payload = {"eval": "ppl", "step": 4, "num_params": 1, "attention": "softmax",
               "train_seq_len": 64, "config": cfg.to_dict(),
               "run": {"source_hash": source * 4, "git_dirty": False},
               "result": {"disjoint": {"perplexity": 9.0, "bits_per_byte": 3.0}}}
    (d / "ppl.json").write_text(json.dumps(payload))
    runs.append(str(tmp_path / name))
  out = compare.compare(runs[:2], str(tmp_path / "cmp"))
  rows = out["table"].splitlines()
  assert "model.attention.softmax.position=rope" in rows[2]
  assert "model.attention.softmax.position=alibi" in rows[3]
  assert "different" not in out["table"]
  out = compare.compare(runs, str(tmp_path / "cmp2"))
  assert "ran different (or unrecorded) code" in out["table"]


@pytest.mark.parametrize("overrides, needle", [
    ({"data.source": "mqar", "data.mqar_num_pairs": "4", "eval.evals": "ppl"},
     "needs text documents, but data.source='mqar'"),
    ({"eval.evals": "niah", "eval.lengths": "16,64"}, "NIAH contexts need at least"),
])
def test_eval_settings_that_cannot_run_fail_before_compiling(overrides, needle):
  with pytest.raises(config_lib.ConfigError, match=needle):
    small_config(**overrides)


def test_evaluate_refuses_an_eval_the_source_cannot_run(tmp_path):
  args = cli_args(**{"data.source": "mqar", "data.mqar_num_pairs": "4"})
  proc = run_module("lmtrain.train", args + ["--config.eval.evals=ppl", "--workdir",
                                             str(tmp_path / "w")])
  assert proc.returncode == 2 and "needs text documents" in one_line(proc)
  assert not (tmp_path / "w").exists()
