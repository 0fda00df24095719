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

MESHES = [(2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2)]  # pure data parallel: launch tests


def mesh_of(sizes, devices=None):
  cfg = dict(zip(parallel.MESH_AXES, sizes))
  devices = jax.devices()[:int(np.prod(sizes))] if devices is None else devices
  return parallel.make_mesh(cfg, devices)


def run_steps(cfg, mesh, batches, state=None):
  """Like lmtrain.train: shardings from the rules, the zigzag layout when sequence > 1."""
  trainer = Trainer.from_config(cfg)
  shardings = trainer.state_shardings(mesh)
  bsh = parallel.batch_sharding(mesh)
  columns = parallel.sequence_layout(mesh, cfg.data.seq_len)
  with jax.set_mesh(mesh):
    if state is None:
      state = jax.jit(trainer.init_state, static_argnums=0, out_shardings=shardings)(0)
    else:
      state = jax.device_put(state, shardings)
    step = jax.jit(trainer.train_step, in_shardings=(shardings, bsh),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    losses = []
    for b in batches:
      if columns is not None:
        b = {k: x[:, columns] for k, x in b.items()}
      state, m = step(state, jax.device_put(b, bsh))
      losses.append(float(m["loss"]))
    hlo = step.lower(state, jax.device_put(b, bsh)).as_text()
  run_steps.used_ring = "ppermute" in hlo or "collective_permute" in hlo
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
        "losses": losses, "specs_ok": specs_ok, "ring": run_steps.used_ring,
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


def ring():
  """Ring attention on 8 devices (sequence = 8) against the single-device reference."""
  from lmtrain.ring_attention import ring_attention, zigzag_permutation
  from pallas_kernels.blockwise import dense_attention
  jax.config.update("jax_enable_x64", False)
  r = np.random.default_rng(0)
  b, t, hq, hkv, d = 2, 64, 4, 2, 16
  q = jnp.asarray(r.normal(size=(b, t, hq, d)), jnp.float32)
  k = jnp.asarray(r.normal(size=(b, t, hkv, d)), jnp.float32)
  v = jnp.asarray(r.normal(size=(b, t, hkv, d)), jnp.float32)
  seg = jnp.asarray(np.sort(r.integers(1, 4, size=(b, t)), axis=1), jnp.int32)
  cot = jnp.asarray(r.normal(size=(b, t, hq, d)), jnp.float32)
  mesh = mesh_of((1, 1, 1, 8))
  perm = zigzag_permutation(t, 8)
  inv = np.argsort(perm)

  def ring_loss(q, k, v):
    out = ring_attention(q[:, perm], k[:, perm], v[:, perm], seg[:, perm], mesh=mesh)
    return jnp.sum(out[:, inv] * cot), out[:, inv]

  def ref_loss(q, k, v):
    out = dense_attention(q, k, v, causal=True, segment_ids=seg)
    return jnp.sum(out * cot), out

  (_, o1), g1 = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  (_, o2), g2 = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  # the half-block pairs each device computes (its work counter)
  from jax.sharding import PartitionSpec as P
  from lmtrain.ring_attention import _ring_forward, local_rows

  def count(q, k, v, seg):
    rows = local_rows(t, 8, jax.lax.axis_index("sequence"))
    return _ring_forward(q, k, v, seg, rows, "sequence", d ** -0.5)[2][None]

  spec = P(("data", "fsdp"), "sequence")
  work = jax.jit(jax.shard_map(count, mesh=mesh, in_specs=(spec,) * 4, out_specs=P("sequence"),
                               check_vma=False))(q[:, perm], k[:, perm], v[:, perm], seg[:, perm])
  return {"out_err": float(jnp.max(jnp.abs(o1 - o2))),
          "grad_err": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(g1, g2)],
          "out_scale": float(jnp.max(jnp.abs(o2))), "work": np.asarray(work).tolist()}


if __name__ == "__main__":
  scenario = sys.argv[1]
  assert jax.device_count() == 8, jax.devices()
  if scenario == "meshes":
    result = meshes()
  elif scenario == "ring":
    result = ring()
  else:
    result = reshard_restore(sys.argv[2])
  print("RESULT " + json.dumps(result))
