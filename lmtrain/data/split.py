"""The train / held-out split: a hash of a stable key per document.

Keys never depend on how a path was typed (relative, absolute, through a symlink, from another
working directory):
  - a file that is a document (stdlib, text): its family, from the path relative to the
    dataset root (the directory given, or the common directory of the files a glob matched);
  - a JSON line: its bytes (a content hash); a Parquet row: its text.
A family keeps near-duplicates in one split: the relative path with every run of digits
removed (`encodings/cp1250.py` and `encodings/cp437.py` are both `encodings/cp.py`), and for
the embedded corpus the whole `encodings/` directory (its codec modules are generated from one
template).
"""
from __future__ import annotations

import hashlib
import re

SPLITS = ("train", "heldout")
STDLIB_FAMILY_DIRS = ("encodings/",)


def family(relative_path: str, family_dirs=()) -> str:
  key = relative_path.replace("\\", "/")
  for d in family_dirs:
    if key.startswith(d):
      return d
  return re.sub(r"\d+", "", key)


def key_fraction(key: bytes | str) -> float:
  """A uniform number in [0, 100) from the key."""
  data = key.encode("utf-8") if isinstance(key, str) else key
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2 ** 64 * 100


def in_split(key: bytes | str, split: str, heldout_percent: float) -> bool:
  heldout = key_fraction(key) < heldout_percent
  return heldout if split == "heldout" else not heldout
