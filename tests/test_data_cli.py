"""The data commands end to end: a BPE tokenizer made by `python -m lmtrain.tokenizer`, a tiny
run with it (profiled) and every eval; data errors from the trainer in one line, exit 2."""
import glob
import json
import os

import pytest

from lmtrain.data.sources import stdlib_root
from tests.conftest import cli_args, run_module

@pytest.mark.slow
def test_bpe_tokenizer_command_then_a_profiled_run_with_evals(tmp_path):
  """README's BPE sequence at test size: the tokenizer command, a run with it (vocabulary
  derived, a profile of one step, perplexity in bits per byte, the data manifest hash)."""
  tok = str(tmp_path / "bpe.json")
  proc = run_module("lmtrain.tokenizer", ["train", "--input",
                                          os.path.join(stdlib_root(), "json", "*.py"),
                                          "--vocab_size", "600", "--out", tok])
  assert proc.returncode == 0, proc.stderr
  workdir = str(tmp_path / "run")
  args = cli_args(f"configs/tiny_bpe.py:tokenizer={tok}",
                  **{"train.steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4,
                     "train.warmup_steps": 1, "train.profile_steps": "2:3",
                     "eval.evals": "ppl", "eval.ppl_tokens": 1024})
  proc = run_module("lmtrain.train", args + ["--workdir", workdir])
  assert proc.returncode == 0, proc.stderr
  assert "wrote a profile of steps 3..3" in proc.stdout
  assert glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
  with open(os.path.join(workdir, "run.json")) as f:
    manifest_hash = json.load(f)["data_manifest_hash"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["vocab_size"] == 640  # 600 padded to a multiple of 128
  with open(os.path.join(workdir, "evals", "ppl.json")) as f:
    ppl = json.load(f)
  assert 0 < ppl["result"]["disjoint"]["bits_per_byte"] < 20
  assert ppl["run"]["data_manifest_hash"] == manifest_hash


def test_a_data_error_is_one_line_and_exit_2_before_compiling(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"body": "no text"}\n' * 10)
  proc = run_module("lmtrain.train", cli_args(**{"data.source": "jsonl", "data.path": str(path)})
                    + ["--workdir", str(tmp_path / "w")])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"lmtrain: error: {path}:1: no field 'text' (data.text_field) in the line (it has "
      "['body'])"]
  assert "compiled" not in proc.stdout
