"""The data manifest hash of a run: what data it read, cheap to compute at start-up.

For prepared shards it is the hash of their manifest.json (which holds the tokenizer's hash, the
source and every shard's size). For a raw source it is the hash of a manifest made on the spot:
the source settings, the tokenizer's file hash, and every file's path relative to the dataset
root with its size (file contents are not read: a 10 GB corpus is not hashed at every start).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os


def data_manifest(data_cfg) -> dict:
  """The manifest of a data config (see the module docstring); JSON-able."""
  from lmtrain.data import shards, sources
  from lmtrain.data.tokenizers import get_tokenizer
  d = data_cfg
  out = {"source": d.source, "tokenizer_sha256": get_tokenizer(d.tokenizer).sha256}
  if d.source == "mqar":
    out.update({k: d[k] for k in d.keys() if k.startswith("mqar_")})
    return out
  if d.source == "arrayrecord":
    out["shards_manifest_sha256"] = shards.manifest_hash(d.path)
    return out
  out.update({"text_field": d.text_field, "heldout_percent": d.heldout_percent,
              "piece_bytes": d.piece_bytes})
  for name in ("path", "eval_path"):
    path = d.get(name)
    if d.source == "stdlib" and name == "path":
      files = sources.stdlib_files()
    elif path:
      files = sources.expand(path, sources.SUFFIXES.get(d.source, ()), f"data.{name}")
    else:
      continue
    out[name] = [(key, os.path.getsize(p)) for key, p in files]
  return out


@functools.lru_cache(maxsize=16)
def _hash(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_manifest_hash(data_cfg) -> str:
  """sha256 (16 hex digits) of `data_manifest`."""
  return _hash(json.dumps(data_manifest(data_cfg), sort_keys=True, default=str))
