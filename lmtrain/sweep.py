"""The attention sweep's list: python -m lmtrain.sweep list

Prints one name per line: every attention kind in the registry (lmtrain/model/mixers) and the
ready variants the mixers declare (e.g. hybrid), the names `configs/tiny.py:attention=NAME`
and `configs/sweep.py:attention=NAME` accept. scripts/sweep.sh trains and evaluates each.
"""
from __future__ import annotations

import sys


def names() -> list[str]:
  from lmtrain.model import mixers
  return list(mixers.variants())


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv != ["list"]:
    print("usage: python -m lmtrain.sweep list", file=sys.stderr)
    return 2
  print("\n".join(names()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
