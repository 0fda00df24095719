"""Checkpoints with orbax: the train state and the data iterator's state, saved together.

Saves are async (the train loop goes on while the arrays are written) and atomic (orbax writes
into a temporary directory and renames it when complete), so a run killed at any moment leaves
its last complete checkpoint. The grain iterator state is captured when `save` is called, at the
exact step boundary, and stored as JSON beside the arrays.

Integrity: once a step is committed, a sha256 of every file it holds is written beside it
(checksums.json). Restoring verifies them; a step that fails (a changed, truncated or missing
file) is reported in one line, moved aside to checkpoints.damaged/ (never deleted), and the
previous intact step is used. A failed async save surfaces at the next check (`check_saved`).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import shutil
import time

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


class CheckpointShapeError(ValueError):
  """The checkpoint's arrays do not fit the config's (another model, not damage)."""


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""


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


CHECKSUMS = "checksums.json"
# orbax rewrites these at commit, after our checksums (a damaged one fails the restore instead)
COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointWriteError(RuntimeError):
  """An async save failed; the message is one line naming the step and the cause."""


def file_checksums(step_dir: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under a step directory."""
  out = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel == CHECKSUMS or rel in COMMIT_FILES:
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
          h.update(chunk)
      out[rel] = [os.path.getsize(path), h.hexdigest()]
  return out


class Checkpointer:
  """Keep-N checkpoints of {"state": pytree, "data": iterator state, "config": the resolved
  config and run metadata} under workdir/checkpoints, each verified by its checksums."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.damaged_directory = self.directory + ".damaged"
    self.async_save = async_save
    self._failed = False
    self._pending = collections.deque()  # steps being saved, checksummed once committed
    self.last_verified = None  # the newest step whose checksums are written
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        async_options=(ocp.AsyncOptions(post_finalization_callback=self._committed)
                       if async_save else None))
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
    self._pending.append(step)
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # the synchronous part of the save (directories, first writes)
      raise self._save_failed(step, _first_line(e) or repr(e)) from e
    if not self.async_save and step in self._pending:
      self._committed()  # synchronous saves are committed on return

  def _committed(self) -> None:
    """After orbax commits the oldest pending step: its checksums, written by process 0."""
    if not self._pending:
      return
    step = self._pending.popleft()
    step_dir = os.path.join(self.directory, str(step))
    if not os.path.isdir(step_dir):  # orbax calls back just before its final rename
      tmp = [n for n in os.listdir(self.directory)
             if n.startswith(f"{step}.orbax-checkpoint-tmp")]
      step_dir = os.path.join(self.directory, tmp[0]) if tmp else step_dir
    if jax.process_index() == 0 and os.path.isdir(step_dir):
      sums = file_checksums(step_dir)
      tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
      with open(tmp, "w") as f:
        json.dump(sums, f)
      os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
    self.last_verified = step

  def check_saved(self) -> None:
    """Raises CheckpointWriteError (one line) if a background save failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # orbax re-raises the save's own error
      cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      raise self._save_failed(self._pending[0] if self._pending else None, cause) from e

  def _save_failed(self, step, cause: str) -> CheckpointWriteError:
    """Marks the run's saving as failed, removes its temporary directories, and returns the
    one-line error naming the step, the cause and the last complete step."""
    self._pending.clear()
    self._failed = True
    try:  # let orbax's other background writes end first, or they refill the directory we remove
      self.manager.wait_until_finished()
    except Exception:  # the failure being reported, raised again
      pass
    self._remove_temporaries()
    return CheckpointWriteError(
        f"saving checkpoint step {step} in {self.directory} failed ({cause}); the last "
        f"complete checkpoint is step {self.last_verified}")

  def _remove_temporaries(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  # -- integrity ------------------------------------------------------------------------------

  def verify(self, step: int) -> str | None:
    """None when every file of `step` matches its checksum, else why not (one phrase). A step
    saved before checksums existed (none written) passes; its restore is the test."""
    step_dir = os.path.join(self.directory, str(step))
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        want = json.load(f)
    except (OSError, ValueError):
      return f"its {CHECKSUMS} is unreadable"
    have_files = set()
    for root, _, files in os.walk(step_dir):
      have_files |= {os.path.relpath(os.path.join(root, f), step_dir) for f in files}
    for rel, (size, digest) in sorted(want.items()):
      full = os.path.join(step_dir, rel)
      if rel not in have_files:
        return f"{rel} is missing"
      if os.path.getsize(full) != size:
        return f"{rel} has {os.path.getsize(full)} bytes, not the {size} it was saved with"
    got = file_checksums(step_dir)
    for rel, (_, digest) in sorted(want.items()):
      if got[rel][1] != digest:
        return f"{rel} does not match its checksum"
    return None

  def move_aside(self, step: int) -> str:
    """Moves a damaged step to checkpoints.damaged/ (kept for inspection); returns where."""
    os.makedirs(self.damaged_directory, exist_ok=True)
    dest = os.path.join(self.damaged_directory, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)), dest)
    self.manager.reload()
    return dest

  def restore_intact(self, abstract_state, shardings=None, *, log=print):
    """(step, state, data_state) of the newest step that verifies and restores; damaged steps
    are reported (one line each) and moved aside. (None, None, None) without any."""
    for step in sorted(self.all_steps(), reverse=True):
      why = self.verify(step)
      if why is None:
        try:
          state, data_state = self.restore(step, abstract_state, shardings)
          return step, state, data_state
        except CheckpointShapeError:
          raise
        except Exception as e:  # an unreadable step, whatever orbax says about it
          why = f"it cannot be read ({type(e).__name__}: {_first_line(e)})"
      where = self.move_aside(step)
      log(f"lmtrain: checkpoint step {step} in {self.directory} is damaged: {why}; moved it to "
          f"{where} and trying the step before it")
    return None, None, None

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
    meta = self.manager.item_metadata(step)["state"]
    # orbax's metadata tree is not a dict (newer orbax): its top level as one
    saved = stack.find_params({k: meta[k] for k in meta.keys()})
    if saved is None:
      return None
    return stack.period_of(saved) if stack.is_scanned(saved) else 0

  def _restore(self, step: int, abstract_state):
    try:  # in the saved layout: a shape error names the array as the checkpoint has it
      self.check_compatible(step, abstract_state)
    except ValueError as e:
      raise CheckpointShapeError(str(e)) from e
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
    try:
      self.manager.wait_until_finished()
    except Exception:  # a failed save was (or will be) reported by check_saved
      self._failed = True
    self.manager.close()
    if self._failed:  # what a failed save left behind takes no space
      self._remove_temporaries()


def _to_layout(params, *, period: int, **ops):
  """A params-shaped tree in the unscanned layout (period 0) or scanned with `period`."""
  take = {"take": ops["take"]} if "take" in ops else {}
  if period == 0:
    return stack.to_unscanned(params, **take)
  return stack.to_scanned(params, period, **ops)
