"""Checkpoints with orbax: the train state and the data iterator's state, saved together.

Saves are async (the train loop goes on while the arrays are written) and atomic (orbax writes
into a temporary directory and renames it when complete), so a run killed at any moment leaves
its last complete checkpoint. The grain iterator state is captured when `save` is called, at the
exact step boundary, and stored as JSON beside the arrays.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmtrain.model import stack


class DataStateMismatch:
  """Restored in place of the iterator state when the checkpoint was written by another number
  of processes (the parameters are still good: evaluation and fine-tuning can use them)."""

  def __init__(self, written_by: int):
    self.written_by = written_by

  def message(self) -> str:
    return (f"the checkpoint's data iterator state was written by {self.written_by} processes, "
            f"and this run has {jax.process_count()}")


def _gather_json(value) -> list:
  """Every process's JSON-able value, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:blob.size] = blob
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(gathered[i][:int(sizes[i][0])]).decode("utf-8"))
          for i in range(jax.process_count())]


class Checkpointer:
  """Keep-N checkpoints of {"state": pytree, "data": iterator state} under workdir/checkpoints."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None, config: dict | None = None) -> None:
    """Saves `state` (written by all processes together), this process's iterator state (every
    process's, gathered, so that each finds its own on restore) and `config`: the resolved
    config and the run's metadata ({"config": ..., "run": ...}) that the checkpoint belongs to."""
    args = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      args["config"] = ocp.args.JsonSave(config)
    if data_state is not None:
      args["data"] = ocp.args.JsonSave({"process_count": jax.process_count(),
                                        "states": _gather_json(data_state)})
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, shardings=None):
    """(state, data_state) at `step`; arrays are placed with `shardings` (any mesh; by default
    this process's first device). A checkpoint written in the other block layout
    (train.scan_layers on or off) is restored in its own and converted: the parameters and every
    tree shaped like them (Adam's moments) are stacked or unstacked per layer."""
    if shardings is None:  # onto this process's first device, whatever mesh wrote it
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: device, abstract_state)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
        shardings)
    saved_layout = self._saved_layout(step)
    target = stack.find_params(abstract_state)
    if saved_layout is not None and target is not None and saved_layout != (
        stack.period_of(target) if stack.is_scanned(target) else 0):
      saved_abstract = stack.convert_tree(abstract_state, functools.partial(
          _to_layout, period=saved_layout, take=stack.abstract_take, stack=stack.abstract_stack))
      state, data = self._restore(step, saved_abstract)
      period = stack.period_of(target) if stack.is_scanned(target) else 0
      state = stack.convert_tree(state, functools.partial(_to_layout, period=period))
      return jax.device_put(state, shardings), data
    return self._restore(step, abstract_state)

  def _saved_layout(self, step: int) -> int | None:
    """The block layout of the saved parameters: 0 unscanned, else the scan's pattern period
    (None when the checkpoint holds no model parameters)."""
    saved = stack.find_params(self.manager.item_metadata(step)["state"])
    if saved is None:
      return None
    return stack.period_of(saved) if stack.is_scanned(saved) else 0

  def _restore(self, step: int, abstract_state):
    self.check_compatible(step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      args["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    if not has_data:
      return restored["state"], None
    data = restored["data"]
    if data["process_count"] != jax.process_count():
      # The arrays restore onto any mesh; each host's data position does not: it belongs to
      # the host's shard of the documents.
      return restored["state"], DataStateMismatch(data["process_count"])
    return restored["state"], data["states"][jax.process_index()]

  def saved_config(self, step: int) -> dict | None:
    """{"config": the resolved config, "run": metadata} saved with `step`; None for a
    checkpoint written without one."""
    path = os.path.join(self.directory, str(step), "config")
    if not os.path.isdir(path):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises ValueError naming the first array whose shape or dtype differs from the saved one."""
    saved = self.manager.item_metadata(step)["state"]
    want = dict(jax.tree_util.tree_flatten_with_path(abstract_state)[0])
    have = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    keystr = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
    want_k = {keystr(p): x for p, x in want.items()}
    have_k = {keystr(p): x for p, x in have.items()}
    for name in sorted(set(want_k) | set(have_k)):
      if name not in have_k or name not in want_k:
        where = "the checkpoint" if name not in have_k else "this config"
        raise ValueError(f"{name} is missing from {where}")
      w, h = want_k[name], have_k[name]
      if tuple(w.shape) != tuple(h.shape) or jax.numpy.dtype(w.dtype) != jax.numpy.dtype(h.dtype):
        raise ValueError(f"{name} is {h.dtype}{list(h.shape)} in the checkpoint but "
                         f"{w.dtype}{list(w.shape)} for this config")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _to_layout(params, *, period: int, **ops):
  """A params-shaped tree in the unscanned layout (period 0) or scanned with `period`."""
  take = {"take": ops["take"]} if "take" in ops else {}
  if period == 0:
    return stack.to_unscanned(params, **take)
  return stack.to_scanned(params, period, **ops)
