"""What produced a result: the code (git commit, dirty flag, a hash of the sources that ran), the
library versions and the machine, and the comparison of a run's resolved config with another's.

Every checkpoint stores the resolved config and this metadata; resume, evaluate and generate
compare the model subtree with it, and every eval JSON and the TensorBoard config text carry
both, so a number is attributable to the exact model, config and code that produced it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("lmtrain", "pallas_kernels", "configs")
# Fields that choose how the same model is computed, not what it computes.
IMPLEMENTATION_FIELDS = ("model.attention.impl",)


def _git(*args) -> str | None:
  try:
    out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
  """sha256 of every .py file under lmtrain/, pallas_kernels/ and configs/ (paths and bytes):
  the code that runs, whether or not it was committed."""
  h = hashlib.sha256()
  for top in SOURCE_DIRS:
    for root, dirs, files in sorted(os.walk(os.path.join(REPO, top))):
      dirs.sort()
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(root, name)
          h.update(os.path.relpath(path, REPO).encode() + b"\0")
          with open(path, "rb") as f:
            h.update(f.read() + b"\0")
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
  """{"git_commit", "git_dirty", "source_hash"}; a launcher that ships a tree without .git passes
  the commit and dirty flag in LMTRAIN_GIT_COMMIT / LMTRAIN_GIT_DIRTY."""
  commit = _git("rev-parse", "HEAD")
  dirty = None
  if commit is not None:
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_DIRS))
  else:
    commit = os.environ.get("LMTRAIN_GIT_COMMIT") or None
    if os.environ.get("LMTRAIN_GIT_DIRTY") in ("0", "1"):
      dirty = os.environ["LMTRAIN_GIT_DIRTY"] == "1"
  return {"git_commit": commit, "git_dirty": dirty, "source_hash": source_hash()}


def run_metadata(data_cfg=None) -> dict:
  """The code version, library versions and the machine of this process; with a data config,
  also the hash of the data it reads (lmtrain.data.fingerprint: a prepared directory's
  manifest, or the source's files and sizes, and the tokenizer file)."""
  import flax
  import jax
  import optax
  import orbax.checkpoint as ocp
  device = jax.devices()[0]
  out = {**code_version(), "python": platform.python_version(), "jax": jax.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "orbax": ocp.__version__,
         "backend": jax.default_backend(), "device_kind": device.device_kind,
         "device_count": jax.device_count(), "process_count": jax.process_count()}
  if data_cfg is not None:
    from lmtrain.data.fingerprint import data_manifest_hash
    out["data_manifest_hash"] = data_manifest_hash(data_cfg)
  return out


def same_code(a: dict | None, b: dict | None) -> bool:
  """Whether two runs ran the same sources (by source hash; unknown counts as different)."""
  return bool(a and b and a.get("source_hash") and a.get("source_hash") == b.get("source_hash"))


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def differences(a: dict, b: dict, *, subtree: str = "model",
                ignore=IMPLEMENTATION_FIELDS) -> list[tuple[str, object, object]]:
  """(field, value in a, value in b) for every field of `subtree` that differs."""
  fa, fb = flatten(a.get(subtree, {}), subtree + "."), flatten(b.get(subtree, {}), subtree + ".")
  return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
          if k not in ignore and fa.get(k) != fb.get(k)]


def describe(diffs, a_name: str, b_name: str, limit: int = 4) -> str:
  """One line: `field: x (a) vs y (b); ...`."""
  parts = [f"{k}: {va!r} ({a_name}) vs {vb!r} ({b_name})" for k, va, vb in diffs[:limit]]
  more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return "; ".join(parts) + more
