"""Figures as images (for TensorBoard and the comparison), and eval JSON files."""
from __future__ import annotations

import io
import json
import os

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def figure_to_array(fig) -> np.ndarray:
  """A matplotlib figure as an RGB uint8 image [H, W, 3]."""
  from PIL import Image
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  _pyplot().close(fig)
  buf.seek(0)
  return np.asarray(Image.open(buf).convert("RGB"))


def heatmap(ax, matrix, xlabels, ylabels, title, vmin=0.0, vmax=1.0):
  matrix = np.asarray(matrix, float)
  im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto", origin="upper")
  ax.set_xticks(range(len(xlabels)), [str(x) for x in xlabels])
  ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels])
  ax.set_title(title, fontsize=9)
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      if np.isfinite(matrix[i, j]):
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if matrix[i, j] < (vmin + vmax) / 2 else "black")
  return im


def heatmap_image(matrix, xlabels, ylabels, *, title, xlabel, ylabel) -> np.ndarray:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(xlabels), 1.0 + 0.5 * len(ylabels)))
  heatmap(ax, matrix, xlabels, ylabels, title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  return figure_to_array(fig)


def line_image(series: dict, *, title, xlabel, ylabel, logx=False) -> np.ndarray:
  """series: label -> (xs, ys)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", label=label)
  if logx:
    ax.set_xscale("log", base=2)
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if len(series) > 1:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return figure_to_array(fig)


def write_json(path: str, payload: dict) -> None:
  """Atomic: write to a temporary file, then rename."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=_to_builtin)
  os.replace(tmp, path)


def _to_builtin(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)
