"""Sharded and multi-process training on CPU: 8 virtual devices, 2 local processes; meshes,
FLOP counts and the launch scripts."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmtrain import parallel
from lmtrain.flops import train_flops_per_step
from tests.conftest import REPO, cli_args, read_scalars, run_module, small_config

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def scenario(*args):
  proc = subprocess.run([sys.executable, "-m", "tests.multidevice", *args], cwd=REPO,
                        env={**os.environ, **EIGHT}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_meshes_give_the_single_device_losses_and_declared_shardings():
  r = scenario("meshes")
  for mesh, got in r["meshes"].items():
    # fp32 sums reduce in another order across devices: equal to 1e-5 relative.
    np.testing.assert_allclose(got["losses"], r["single"], rtol=1e-5, err_msg=mesh)
    assert got["specs_ok"], mesh
  m = r["meshes"]
  assert m["(2, 4, 1, 1)"]["embed_spec"] == "P(None, 'fsdp')"  # FSDP shards params
  assert m["(2, 4, 1, 1)"]["embed_shard_shape"] == [258, 16]
  assert m["(2, 4, 1, 1)"]["mu_spec"] == "P(None, 'fsdp')"  # and the Adam moments with them
  assert m["(2, 2, 2, 1)"]["q_spec"] == "P('fsdp', 'tensor', None)"  # heads over tensor
  assert m["(1, 2, 2, 2)"]["embed_spec"] == "P('tensor', 'fsdp')"
  assert m["(1, 2, 2, 2)"]["ring"] and not m["(2, 2, 2, 1)"]["ring"]  # ring attention ran


@pytest.mark.slow
def test_ring_attention_on_8_devices_equals_the_reference():
  r = scenario("ring")
  assert r["out_err"] < 1e-5 * r["out_scale"] + 1e-6
  assert max(r["grad_err"]) < 1e-5
  # zigzag skips what causality masks: each of the 8 devices computes 2n + 1 = 17 of its 4n = 32
  # half-block pairs, together the (2n)(2n + 1) / 2 = 136 causal ones of the 16 x 16
  assert r["work"] == [17] * 8


def test_zigzag_layout_balances_causal_work():
  from lmtrain.ring_attention import local_rows, zigzag_permutation
  perm = zigzag_permutation(32, 4)
  assert sorted(perm.tolist()) == list(range(32))
  shards = perm.reshape(4, 8)
  for i in range(4):
    np.testing.assert_array_equal(shards[i], np.asarray(local_rows(32, 4, i)))
  # causal pairs each shard's queries see: equal for every shard
  work = [sum(int(r) + 1 for r in shard) for shard in shards]
  assert len(set(work)) == 1
  with pytest.raises(ValueError, match="divisible by 8"):
    zigzag_permutation(36, 4)


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
  r = scenario("reshard", str(tmp_path / "ckpt"))
  assert r["q_spec"] == "P('fsdp', 'tensor', None)"
  np.testing.assert_allclose(r["resharded"], r["continued"], rtol=1e-5)
  assert r["data_state_ok"]


def test_mesh_sizes_resolve_and_bad_ones_fail():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1, "sequence": 1}, 8) == (4, 2, 1, 1)
  with pytest.raises(parallel.MeshError, match="does not divide 8 devices"):
    parallel.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1, "sequence": 1}, 8)
  with pytest.raises(parallel.MeshError, match="uses 4 devices, but there are 8"):
    parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1, "sequence": 1}, 8)


def test_cli_mesh_that_does_not_divide_devices_exits_2(tmp_path):
  proc = run_module("lmtrain.train", cli_args(**{"mesh.data": 3}) + ["--workdir", str(tmp_path)],
                    env=EIGHT)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "lmtrain: error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1, 'sequence': 1} uses 3 devices, "
      "but there are 8"]


def test_logical_rules_replicate_what_does_not_divide():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), parallel.MESH_AXES)
  assert parallel.logical_to_spec(("embed", "kv_heads"), (64, 1), mesh) == jax.sharding.PartitionSpec(None, None)


@pytest.mark.slow
def test_two_processes_train_together_like_one_process_with_the_global_batch(tmp_path):
  workdir = str(tmp_path / "two")
  overrides = {"train.steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4,
               "train.warmup_steps": 1}
  args = cli_args(**overrides) + ["--workdir", workdir]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lmtrain.train", *args, "--coordinator_address=localhost:23456",
       "--num_processes=2", f"--process_id={i}"], cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert "step 4/4" in outs[0] and "step 4/4" not in outs[1]  # one console
  two_proc = read_scalars(workdir)["train/loss"]

  # The same steps in this process: the global batch is host 0's rows then host 1's rows.
  from lmtrain.checkpoint import Checkpointer
  from lmtrain.data import train_dataset
  from lmtrain.trainer import Trainer
  cfg = small_config(**overrides)
  hosts = [iter(train_dataset(cfg, process_index=i, process_count=2)) for i in range(2)]
  first = [next(h) for h in hosts]
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])  # different data per host
  trainer = Trainer.from_config(cfg)
  state = jax.jit(trainer.init_state, static_argnums=0)(cfg.train.seed)
  step = jax.jit(trainer.train_step)
  losses = []
  for i in range(4):
    parts = first if i == 0 else [next(h) for h in hosts]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  np.testing.assert_allclose([two_proc[s] for s in range(1, 5)], losses, rtol=1e-5)
  # Both processes wrote one checkpoint; a single process restores it.
  ckpt = Checkpointer(workdir, keep=3)
  assert ckpt.all_steps() == [4]
  restored, data_state = ckpt.restore(4, trainer.abstract_state())
  for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert "2 processes" in data_state.message()


@pytest.mark.slow
def test_launch_local_two_processes_with_an_explicit_kernel_impl(tmp_path):
  """Config validation asks the kernels' table for the backend: it must run after
  jax.distributed.initialize, or a multi-process run with an explicit impl dies at start-up."""
  workdir = str(tmp_path / "impl")
  args = cli_args(**{"train.steps": 1, "train.checkpoint_every": 1, "train.eval_every": 1,
                     "train.warmup_steps": 0, "data.eval_batches": 1, "model.num_layers": 1,
                     "data.seq_len": 16, "data.batch_size": 2, "model.attention.impl": "interpret"})
  proc = subprocess.run(["bash", "launch/local.sh", "2", "--port", "23467", "--", *args,
                         "--workdir", workdir], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[0] lmtrain: done" in proc.stdout


# ---- FLOPs -----------------------------------------------------------------------------------

def test_pair_counts_of_the_sparse_kinds():
  from lmtrain.model import mixers
  pairs = lambda kind, t, **kw: mixers.get(kind).pairs(mixers.get(kind).Options(**kw), t)
  t = 64
  assert pairs("softmax", t) == t * (t + 1) / 2
  assert pairs("sliding_window", t, window=1000) == t * (t + 1) / 2
  assert pairs("sliding_window", t, window=8) == sum(min(i + 1, 8) for i in range(t))
  assert pairs("moba", t, block_size=16, top_k=100) == t * (t + 1) / 2
  assert pairs("moba", t, block_size=16, top_k=2) == sum((i % 16) + 1 + (16 if i >= 16 else 0)
                                                         for i in range(t))
  assert pairs("block_sparse", t, block_size=16, local_blocks=4, global_blocks=0,
               stride=0) == t * (t + 1) / 2


def test_matmul_flops_are_six_per_parameter_per_token():
  from lmtrain.trainer import build_model
  cfg = small_config()
  fns, init = build_model(cfg.model)
  params = jax.eval_shape(init, jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  n = sum(int(np.prod(x.shape)) for p, x in flat
          if x.ndim >= 2 and not jax.tree_util.keystr(p).startswith("['embed']"))
  total = train_flops_per_step(cfg.model, 2, 64)
  attn = 3 * 2 * 4 * 2 * 32 * (64 * 65 / 2) * cfg.model.num_layers  # 3 x B x 4 H Dh pairs
  assert total == pytest.approx(6 * n * 2 * 64 + attn)


# ---- launch scripts --------------------------------------------------------------------------

def _git_copy(dest):
  """A committed copy of the repository's launch scripts in a fresh git repository."""
  import shutil
  os.makedirs(os.path.join(dest, "launch"))
  shutil.copy(os.path.join(REPO, "launch", "tpu_pod.sh"), os.path.join(dest, "launch"))
  with open(os.path.join(dest, "README.md"), "w") as f:
    f.write("x\n")
  git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                  cwd=dest, check=True, capture_output=True)
  git("init", "-q")
  git("add", "-A")
  git("commit", "-qm", "x")
  return dest


def test_tpu_pod_dry_run_prints_every_gcloud_command(tmp_path):
  copy = _git_copy(str(tmp_path / "repo"))
  pod = lambda *args: subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=copy,
                                     capture_output=True, text=True, timeout=60)
  proc = pod("--name", "pod1", "--zone", "us-east5-a", "--accelerator", "v5p-64", "--dry-run",
             "--", "--config", "configs/tiny.py", "--workdir", "/mnt/runs/x")
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith("+")]
  assert lines[0] == ("+ gcloud compute tpus tpu-vm create pod1 --zone us-east5-a "
                      "--accelerator-type v5p-64 --version v2-alpha-tpuv5")
  assert "shipping commit" in proc.stdout and "(clean)" in proc.stdout
  assert any("git archive --format=tar.gz -o /tmp/lmtrain-pod1.tgz HEAD" in l for l in lines)
  assert any("tpu-vm scp /tmp/lmtrain-pod1.tgz pod1:lmtrain.tgz --zone us-east5-a --worker=all"
             in l for l in lines)
  run = [l for l in lines if "lmtrain.train" in l]
  assert len(run) == 1 and "--worker=all" in run[0] and "configs/tiny.py" in run[0]
  assert "LMTRAIN_GIT_DIRTY=0" in run[0] and "LMTRAIN_GIT_COMMIT=" in run[0]
  assert lines[-1] == "+ gcloud compute tpus tpu-vm delete pod1 --zone us-east5-a --quiet"
  proc = pod("--name", "q", "--zone", "z", "--accelerator", "v4-32", "--queued", "--keep",
             "--dry-run", "--", "x")
  assert "queued-resources create q --node-id q" in proc.stdout
  assert "delete" not in proc.stdout  # --keep
  proc = pod("--zone", "z", "--dry-run", "--", "x")
  assert proc.returncode == 2 and "--name is required" in proc.stderr
  assert sorted(os.listdir(copy)) == [".git", "README.md", "launch"]  # no log written here
  # an edited checkout is refused (the run would be attributed to code that did not run) ...
  with open(os.path.join(copy, "README.md"), "a") as f:
    f.write("edited\n")
  args = ["--name", "d", "--zone", "z", "--accelerator", "v4-8", "--dry-run", "--", "x"]
  proc = pod(*args)
  assert proc.returncode == 2 and "uncommitted changes (README.md)" in proc.stderr
  assert proc.stdout == ""
  # ... unless the working tree is shipped as it is, which the run then records as dirty
  proc = pod("--allow-dirty", *args)
  assert proc.returncode == 0, proc.stderr
  assert "shipping the working tree" in proc.stdout and "LMTRAIN_GIT_DIRTY=1" in proc.stdout
  assert "ls-files" in proc.stdout and "--exclude-standard" in proc.stdout


def test_sequence_parallel_mesh_rejects_kinds_ring_attention_cannot_run(tmp_path):
  args = cli_args(**{"mesh.sequence": 2, "mesh.data": -1}) + ["--workdir", str(tmp_path)]
  args[1] = "configs/tiny.py:attention=linear"
  proc = run_module("lmtrain.train", args, env=EIGHT)
  assert proc.returncode == 2
  assert ("attention kind 'linear' has no sequence-parallel form"
          in proc.stderr.strip().splitlines()[-1])
  proc = run_module("lmtrain.train", cli_args(**{"mesh.data": 16}) + ["--workdir", str(tmp_path)],
                    env=EIGHT)
  assert proc.returncode == 2 and "uses 16 devices" in proc.stderr


@pytest.mark.slow
def test_cli_trains_with_ring_attention_on_a_sequence_mesh(tmp_path):
  args = cli_args(**{"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": 4,
                     "train.steps": 3, "train.checkpoint_every": 3, "train.eval_every": 3,
                     "train.warmup_steps": 1})
  proc = run_module("lmtrain.train", args + ["--workdir", str(tmp_path)], env=EIGHT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  losses = read_scalars(str(tmp_path))["train/loss"]
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
