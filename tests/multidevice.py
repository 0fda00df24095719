"""Multi-device scenarios, run in a subprocess with 8 virtual CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice SCENARIO

prints one JSON line with what the test asserts on.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain import parallel
from lmtrain.data import train_dataset
from lmtrain.trainer import Trainer
from tests.conftest import small_config

MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2)]


def mesh_of(sizes, devices=None):
  cfg = dict(zip(parallel.MESH_AXES, sizes))
  devices = jax.devices()[:int(np.prod(sizes))] if devices is None else devices
  return parallel.make_mesh(cfg, devices)


def run_steps(cfg, mesh, batches, state=None):
  trainer = Trainer.from_config(cfg)
  shardings = trainer.state_shardings(mesh)
  bsh = parallel.batch_sharding(mesh)
  if state is None:
    state = jax.jit(trainer.init_state, static_argnums=0, out_shardings=shardings)(0)
  else:
    state = jax.device_put(state, shardings)
  step = jax.jit(trainer.train_step, in_shardings=(shardings, bsh),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  losses = []
  for b in batches:
    state, m = step(state, jax.device_put(b, bsh))
    losses.append(float(m["loss"]))
  return state, losses, trainer, shardings


def meshes():
  cfg = small_config(**{"model.num_heads": 4, "model.num_kv_heads": 2, "train.steps": 10})
  it = iter(train_dataset(cfg))
  batches = [next(it) for _ in range(3)]
  _, base, _, _ = run_steps(cfg, mesh_of((1, 1, 1, 1)), batches)
  out = {"single": base, "meshes": {}}
  for sizes in MESHES:
    mesh = mesh_of(sizes)
    state, losses, trainer, shardings = run_steps(cfg, mesh, batches)
    specs_ok = all(
        a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
            jax.tree.leaves(state["params"]), jax.tree.leaves(shardings["params"])))
    emb = state["params"]["embed"]["embedding"]
    q = state["params"]["blocks"][0]["attn"]["q_proj"]["kernel"]
    mu = state["opt_state"][1][0].mu["embed"]["embedding"]
    out["meshes"][str(sizes)] = {
        "losses": losses, "specs_ok": specs_ok,
        "embed_spec": str(emb.sharding.spec), "q_spec": str(q.sharding.spec),
        "embed_shard_shape": list(emb.sharding.shard_shape(emb.shape)),
        "mu_spec": str(mu.sharding.spec)}
  return out


def reshard_restore(tmpdir):
  """Save on (8,1,1,1), restore on (2,2,2,1): the next loss equals the un-resharded run's."""
  from lmtrain.checkpoint import Checkpointer
  cfg = small_config(**{"model.num_heads": 4, "model.num_kv_heads": 2})
  it = iter(train_dataset(cfg))
  batches = [next(it) for _ in range(4)]
  state, losses_a, trainer, shardings = run_steps(cfg, mesh_of((8, 1, 1, 1)), batches[:2])
  ckpt = Checkpointer(tmpdir, keep=2)
  ckpt.save(2, state, it.get_state())
  ckpt.wait()
  _, cont_same, _, _ = run_steps(cfg, mesh_of((8, 1, 1, 1)), batches[2:], state=state)
  mesh_b = mesh_of((2, 2, 2, 1))
  shard_b = trainer.state_shardings(mesh_b)
  restored, data_state = Checkpointer(tmpdir, keep=2).restore(2, trainer.abstract_state(),
                                                              shard_b)
  q = restored["params"]["blocks"][0]["attn"]["q_proj"]["kernel"]
  _, cont_resharded, _, _ = run_steps(cfg, mesh_b, batches[2:], state=restored)
  return {"continued": cont_same, "resharded": cont_resharded, "q_spec": str(q.sharding.spec),
          "data_state_ok": data_state is not None}


if __name__ == "__main__":
  scenario = sys.argv[1]
  assert jax.device_count() == 8, jax.devices()
  result = meshes() if scenario == "meshes" else reshard_restore(sys.argv[2])
  print("RESULT " + json.dumps(result))
