"""Nothing lost, nothing silent: a second trainer on a workdir, damaged checkpoints, failed
saves, unwritable directories and user errors each end in one line (or are survived), and no
run loses another's work."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lmtrain import workdir as workdir_lib
from lmtrain.checkpoint import Checkpointer
from lmtrain.train import train
from tests.conftest import REPO, cli_args, read_scalars, run_module, small_config


def one_line(proc, code=2):
  assert proc.returncode == code, (proc.returncode, proc.stderr)
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def wait_for(predicate, timeout=120.0):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.2)
  return False


@pytest.mark.slow
def test_a_second_trainer_on_a_workdir_exits_2_and_the_first_loses_nothing(tmp_path):
  workdir = str(tmp_path / "w")
  first = subprocess.Popen(
      [sys.executable, "-m", "lmtrain.train", *cli_args(**{"train.steps": 100000}),
       "--workdir", workdir], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    assert wait_for(lambda: os.path.exists(os.path.join(workdir, "checkpoints", "10"))), \
        "the first trainer did not save"
    second = run_module("lmtrain.train", cli_args(**{"train.lr": 1e-3}) + ["--workdir", workdir])
    line = one_line(second)
    assert f"is in use by another trainer (pid {first.pid} on host" in line
  finally:
    first.send_signal(signal.SIGTERM)  # saves at the current step and exits
    out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err
  saved = Checkpointer(workdir, keep=3).all_steps()
  assert saved and max(saved) >= 10
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["train"]["lr"] == 3e-3  # the first run's config, not the second's
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released on exit


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
  os.makedirs(tmp_path / "w")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  with open(tmp_path / "w" / workdir_lib.LOCK, "w") as f:
    json.dump({"host": __import__("socket").gethostname(), "pid": int(dead),
               "started": time.time(), "heartbeat": time.time()}, f)
  said = []
  with workdir_lib.WorkdirLock(str(tmp_path / "w"), log=said.append):
    held = json.load(open(tmp_path / "w" / workdir_lib.LOCK))
    assert held["pid"] == os.getpid()
  assert "taking over" in said[0] and f"process {dead} on this host is gone" in said[0]
  # another host whose heartbeat stopped long ago
  with open(tmp_path / "w" / workdir_lib.LOCK, "w") as f:
    json.dump({"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time() - 3600}, f)
  with workdir_lib.WorkdirLock(str(tmp_path / "w"), log=said.append):
    pass
  assert "heartbeat stopped" in said[-1]
  # a live one is not taken
  with open(tmp_path / "w" / workdir_lib.LOCK, "w") as f:
    json.dump({"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time()}, f)
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another trainer"):
    with workdir_lib.WorkdirLock(str(tmp_path / "w"), log=said.append):
      pass


@pytest.mark.slow
def test_flipped_bytes_in_the_latest_checkpoint_resume_from_the_previous_bit_identically(
    tmp_path, capsys):
  # a constant learning rate after warmup: the schedule does not depend on train.steps
  steps = {"train.checkpoint_every": 5, "train.eval_every": 100, "train.warmup_steps": 2,
           "train.end_lr_ratio": 1.0}
  reference = str(tmp_path / "reference")
  train(small_config(**{**steps, "train.steps": 15}), reference)
  run = str(tmp_path / "run")
  train(small_config(**{**steps, "train.steps": 10}), run)
  files = [f for f in glob.glob(os.path.join(run, "checkpoints", "10", "state", "**"),
                                recursive=True) if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, "rb").read())
  for i in range(0, len(data), max(len(data) // 1000, 1)):
    data[i] ^= 0xFF
  open(largest, "wb").write(bytes(data))
  capsys.readouterr()
  train(small_config(**{**steps, "train.steps": 15}), run)
  said = capsys.readouterr().out
  assert "checkpoint step 10" in said and "does not match its checksum" in said
  assert "resumed from checkpoint step 5" in said
  moved = os.listdir(os.path.join(run, "checkpoints.damaged"))
  assert len(moved) == 1 and moved[0].startswith("10-")  # kept for inspection, not deleted
  got, want = read_scalars(run)["train/loss"], read_scalars(reference)["train/loss"]
  assert [got[s] for s in range(6, 16)] == [want[s] for s in range(6, 16)]


def test_truncated_or_missing_files_fall_back_to_the_previous_intact_step(tmp_path, capsys):
  steps = {"train.checkpoint_every": 2, "train.eval_every": 100, "train.warmup_steps": 1,
           "train.steps": 8, "train.keep_checkpoints": 4}
  run = str(tmp_path / "run")
  train(small_config(**steps), run)
  files = lambda step: [f for f in glob.glob(os.path.join(run, "checkpoints", str(step), "**"),
                                             recursive=True) if os.path.isfile(f)]
  largest = max(files(8), key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)  # a truncated array file
  os.remove([f for f in files(6) if f.endswith("/state/_METADATA")][0])  # a deleted _METADATA
  for f in glob.glob(os.path.join(run, "checkpoints", "4", "data", "*")):
    os.remove(f)  # a deleted iterator state
  capsys.readouterr()
  train(small_config(**{**steps, "train.steps": 10}), run)
  said = capsys.readouterr().out.splitlines()
  damaged = [l for l in said if "is damaged" in l]
  assert [l.split("checkpoint step ")[1].split()[0] for l in damaged] == ["8", "6", "4"]
  assert all(l.count("\n") == 0 for l in damaged)
  assert any("resumed from checkpoint step 2" in l for l in said)
  assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(run, "checkpoints.damaged"))) \
      == ["4", "6", "8"]


def test_a_failed_background_save_stops_the_run_in_one_line(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  from lmtrain.checkpoint import CheckpointWriteError
  real = ocp.StandardCheckpointHandler.async_save

  async def full(self, directory, *args, **kwargs):
    if "/4.orbax-checkpoint-tmp" in str(directory):
      raise OSError(28, "No space left on device")
    return await real(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full)
  run = str(tmp_path / "run")
  with pytest.raises(CheckpointWriteError) as e:
    train(small_config(**{"train.checkpoint_every": 2, "train.steps": 12,
                          "train.warmup_steps": 1, "train.eval_every": 100}), run)
  msg = str(e.value)
  assert "\n" not in msg and "saving checkpoint step 4" in msg
  assert "No space left on device" in msg and "the last complete checkpoint is step 2" in msg
  names = os.listdir(os.path.join(run, "checkpoints"))
  assert "2" in names and not [n for n in names if "tmp" in n]


def test_unwritable_or_misplaced_directories_exit_2_before_compiling(tmp_path):
  args = cli_args(**{"train.steps": 2, "train.warmup_steps": 1})
  run = tmp_path / "run"
  run.mkdir()
  (run / "checkpoints").write_text("not a directory")
  line = one_line(run_module("lmtrain.train", args + ["--workdir", str(run)]))
  assert "checkpoint directory" in line and "is a file" in line
  (tmp_path / "file").write_text("x")
  line = one_line(run_module("lmtrain.train", args + ["--workdir", str(tmp_path / "file" / "w")]))
  assert "is a file" in line
  if os.geteuid() != 0:  # root writes anywhere
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    line = one_line(run_module("lmtrain.train", args + ["--workdir", str(ro)]))
    assert "not writable" in line


def test_user_errors_are_one_line(tmp_path):
  assert "--config is required" in one_line(run_module("lmtrain.train",
                                                       ["--workdir", str(tmp_path)]))
  missing = run_module("lmtrain.evaluate", ["--workdir", str(tmp_path / "nowhere")])
  assert "no checkpoints in" in one_line(missing)
  assert not (tmp_path / "nowhere").exists()  # evaluate creates nothing


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_ctrl_c_during_the_compile_is_quiet(tmp_path):
  args = cli_args(**{"train.steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4,
                     "train.warmup_steps": 1}) + ["--workdir", str(tmp_path / "w")]
  assert run_module("lmtrain.train", args).returncode == 0
  again = run_module("lmtrain.train", args)
  assert again.returncode == 0
  assert "at step 4, and train.steps=4: nothing to train" in again.stdout
  assert "compiled" not in again.stdout
  proc = subprocess.Popen([sys.executable, "-m", "lmtrain.train",
                           *cli_args(**{"train.steps": 8}), "--workdir", str(tmp_path / "c")],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert wait_for(lambda: os.path.exists(tmp_path / "c" / workdir_lib.LOCK))
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  lines = [l for l in err.strip().splitlines() if l.strip()]
  if proc.returncode == 130:  # interrupted before the loop: quietly
    assert lines == ["lmtrain: interrupted"], err
  else:  # the loop had started: it saved and exited
    assert proc.returncode == 0, err
