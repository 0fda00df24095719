"""TensorBoard event files (tensorboardX: no tensorflow needed) and the console progress line."""
from __future__ import annotations

import sys
import time

import jax
import numpy as np


class MetricWriter:
  """Scalars, text and images into TensorBoard event files under `logdir`; only process 0
  writes, other processes get a writer that does nothing."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(value), global_step=int(step))

  def text(self, step: int, tag: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=int(step))

  def image(self, step: int, tag: str, image_HWC: np.ndarray) -> None:
    if self._writer is not None:
      self._writer.add_image(tag, image_HWC, global_step=int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _fmt_duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
  """One console line per log interval: step, loss, tokens/s, step time and time left.

  On a terminal the line is rewritten in place; in a log file each update is its own line.
  """

  def __init__(self, total_steps: int, stream=None):
    self.total = total_steps
    self.stream = stream or sys.stdout
    self.inplace = self.stream.isatty()
    self.silent = jax.process_index() != 0  # one console for the whole job

  def update(self, step: int, loss: float, tokens_per_sec: float, step_time: float,
             extra: str = "") -> None:
    if self.silent:
      return
    eta = _fmt_duration(max(self.total - step, 0) * step_time)
    line = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | "
            f"{tokens_per_sec / 1e3:,.1f}k tok/s | {step_time * 1e3:.0f} ms/step | eta {eta}")
    if extra:
      line += f" | {extra}"
    if self.inplace:
      self.stream.write("\r\033[K" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.silent:
      return
    if self.inplace:
      self.stream.write("\n")
    self.stream.write(text + "\n")
    self.stream.flush()


class Stopwatch:
  def __init__(self):
    self.last = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed, self.last = now - self.last, now
    return elapsed
