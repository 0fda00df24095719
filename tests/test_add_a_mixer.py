"""README's "Add your own attention", done as a researcher would: a copy of the repository plus
the README's two files (the mixer and its test), no other file edited. The new kind is
selectable, trains, is listed by the sweep, counted in FLOPs, evaluated and compared, and its
own test passes."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SMALL_OVERRIDES


def readme_files() -> dict[str, str]:
  """path -> text of every `<!-- file: PATH -->` fenced block in README.md."""
  text = open(os.path.join(REPO, "README.md")).read()
  found = re.findall(r"<!-- file: (\S+) -->\s*```python\n(.*?)```", text, flags=re.S)
  return {path: body for path, body in found}


def copy_repo(dest: str) -> None:
  files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
  for rel in files:
    src = os.path.join(REPO, rel)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, rel))


def run(copy, *args, env=None, timeout=300):
  proc = subprocess.run([sys.executable, *args], cwd=copy, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_a_new_mixer_is_one_module_plus_its_test(tmp_path):
  files = readme_files()
  assert set(files) == {"lmtrain/model/mixers/fixed_decay.py", "tests/test_fixed_decay.py"}
  copy = str(tmp_path / "repo")
  copy_repo(copy)
  for path, body in files.items():
    assert not os.path.exists(os.path.join(copy, path))
    with open(os.path.join(copy, path), "w") as f:
      f.write(body)
  # the copy's lmtrain is the one imported (not the installed checkout)
  where = run(copy, "-c", "import lmtrain; print(lmtrain.__file__)")
  assert where.strip().startswith(copy)

  assert "fixed_decay" in run(copy, "-m", "lmtrain.sweep", "list").split()
  dry = subprocess.run(["bash", "scripts/sweep.sh", "out"], cwd=copy, capture_output=True,
                       text=True, env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable},
                       timeout=120)
  assert dry.returncode == 0, dry.stderr
  assert "configs/sweep.py:attention=fixed_decay" in dry.stdout

  run(copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fixed_decay.py")

  flops = run(copy, "-c", (
      "import sys; sys.path.insert(0, '.')\n"
      "from tests.conftest import small_config\n"
      "from lmtrain.flops import matmul_params, train_flops_per_step\n"
      "cfg = small_config('attention=fixed_decay')\n"
      "print(train_flops_per_step(cfg.model, 1, 64), 6 * matmul_params(cfg.model) * 64)"))
  total, matmuls = map(float, flops.split())
  assert total > matmuls > 0  # its token mixing is counted on top of the matmuls

  workdir = os.path.join(copy, "runs", "fd")
  args = ["--config", "configs/tiny.py:attention=fixed_decay"]
  args += [f"--config.{k}={v}" for k, v in {**SMALL_OVERRIDES, "train.steps": 6,
                                             "train.checkpoint_every": 6,
                                             "train.eval_every": 6}.items()]
  out = run(copy, "-m", "lmtrain.train", *args, "--workdir", workdir)
  assert "done" in out
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["attention"]["kind"] == "fixed_decay"
  assert saved["model"]["attention"]["fixed_decay"] == {"chunk_size": 64}
  run(copy, "-m", "lmtrain.evaluate", *args, "--workdir", workdir, "--evals", "ppl",
      "--config.eval.ppl_tokens=1024")
  run(copy, "-m", "lmtrain.compare", workdir, "--out", os.path.join(copy, "cmp"))
  table = open(os.path.join(copy, "cmp", "comparison.md")).read()
  assert "| fd | fixed_decay |" in table
  assert "Retentive Network" in table
