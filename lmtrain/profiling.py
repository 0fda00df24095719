"""train.profile_steps="N:M": a jax.profiler trace of training steps N+1 .. M (N steps done
before it starts, M when it stops), written into the workdir where TensorBoard's profile tab
finds it (WORKDIR/plugins/profile/<run>/; install tensorboard-plugin-profile to view it).

No cost when unset: the trainer then holds no profiler at all.
"""
from __future__ import annotations

import jax

from lmtrain import config as config_lib


class StepProfiler:
  """Call `before(step)` ahead of each train step and `after(step, state)` once it is
  dispatched (`step` counts the steps done)."""

  def __init__(self, start: int, stop: int, logdir: str):
    self.start, self.stop, self.logdir = start, stop, logdir
    self.active = False

  @classmethod
  def from_config(cls, cfg, workdir: str) -> "StepProfiler | None":
    window = config_lib.profile_window(cfg)
    if window is None or jax.process_index() != 0:
      return None
    return cls(*window, workdir)

  def before(self, step: int) -> None:
    if step == self.start and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.stop:
      jax.block_until_ready(state)  # the traced steps finish inside the trace
      jax.profiler.stop_trace()
      self.active = False
      print(f"lmtrain: wrote a profile of steps {self.start + 1}..{self.stop} to "
            f"{self.logdir}/plugins/profile", flush=True)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
