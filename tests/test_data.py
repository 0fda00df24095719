"""The grain pipeline: determinism, resumable state, packing, sources and the held-out split."""
import json

import numpy as np
import pytest

from lmtrain.data import (ByteTokenizer, load_documents, packed_dataset, set_iterator_state,
                          train_dataset)
from lmtrain.data.sources import jsonl_documents
from lmtrain.data.sources import stdlib_documents
from tests.conftest import small_config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_other_seed_other_batches():
  cfg = small_config()
  a = _take(iter(train_dataset(cfg)), 5)
  b = _take(iter(train_dataset(cfg)), 5)
  assert all(_equal(x, y) for x, y in zip(a, b))
  cfg.train.seed = 1
  c = _take(iter(train_dataset(cfg)), 5)
  assert not all(_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("consumed", [1, 7, 9, 20])
def test_iterator_state_resumes_exactly_and_is_json(consumed):
  cfg = small_config()
  it = iter(train_dataset(cfg))
  _take(it, consumed)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
  expected = _take(it, 5)
  resumed = iter(train_dataset(cfg))
  set_iterator_state(resumed, state)
  assert all(_equal(x, y) for x, y in zip(expected, _take(resumed, 5)))


def test_packing_rows_hold_whole_documents_in_order(tmp_path):
  docs = [b"alpha beta", b"x" * 50, b"gamma", b"", b"delta epsilon zeta"]
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"text": d.decode()}) for d in docs) + "\n")
  tok = ByteTokenizer()
  documents = jsonl_documents(str(path))
  seq_len = 16
  rows = []
  for batch in packed_dataset(documents, tok, seq_len=seq_len, batch_size=1, seed=None,
                              repeat=False):
    rows.append({k: v[0] for k, v in batch.items()})
  # Reassemble every segment: inputs are BOS + bytes, targets are bytes + EOS, shifted by one.
  pieces = []
  for row in rows:
    seg = row["segment_ids"]
    assert row["tokens"].shape == (seq_len,)
    assert np.all(row["tokens"][seg == 0] == 0) and np.all(row["targets"][seg == 0] == 0)
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments are contiguous"
      assert np.array_equal(row["positions"][idx], np.arange(len(idx))), "positions restart"
      assert np.array_equal(row["tokens"][idx][1:], row["targets"][idx][:-1])
      pieces.append((row["tokens"][idx], row["targets"][idx]))
  stream_in = np.concatenate([p[0] for p in pieces])
  stream_tg = np.concatenate([p[1] for p in pieces])
  expected_in = np.concatenate([[tok.bos_id, *tok.encode(d)] for d in docs])
  expected_tg = np.concatenate([[*tok.encode(d), tok.eos_id] for d in docs])
  assert np.array_equal(stream_in, expected_in)
  assert np.array_equal(stream_tg, expected_tg)


def test_stdlib_split_is_disjoint_deterministic_and_covers_all():
  cfg = small_config()
  train = load_documents(cfg.data, "train")
  held = load_documents(cfg.data, "heldout")
  everything = stdlib_documents()
  assert set(train.paths).isdisjoint(held.paths)
  assert len(train) + len(held) == len(everything)
  assert 0.01 < len(held) / len(everything) < 0.15  # heldout_percent = 5
  assert load_documents(cfg.data, "heldout").paths == held.paths
  assert all("site-packages" not in p for p in train.paths)


def test_text_source_directory_and_eval_path(tmp_path):
  (tmp_path / "train").mkdir()
  for i in range(3):
    (tmp_path / "train" / f"{i}.txt").write_text(f"document number {i}\n" * 20)
  (tmp_path / "held.txt").write_text("held out text\n" * 20)
  cfg = small_config(**{"data.source": "text", "data.path": str(tmp_path / "train"),
                        "data.eval_path": str(tmp_path / "held.txt")})
  train = load_documents(cfg.data, "train")
  held = load_documents(cfg.data, "heldout")
  assert len(train) == 3 and train[0].startswith(b"document number 0")
  assert len(held) == 1 and held[0].startswith(b"held out")
  batch = next(iter(train_dataset(cfg)))
  assert batch["tokens"].shape == (8, 64)
  assert ByteTokenizer().decode(batch["tokens"][0]).count("document number") >= 1


def test_jsonl_missing_field_is_reported(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"body": "no text field"}\n')
  with pytest.raises(KeyError, match="'text'"):
    jsonl_documents(str(path))[0]


def test_process_shards_are_disjoint():
  cfg = small_config()
  a = next(iter(train_dataset(cfg, process_index=0, process_count=2)))
  b = next(iter(train_dataset(cfg, process_index=1, process_count=2)))
  assert a["tokens"].shape == (4, 64)
  assert not np.array_equal(a["tokens"], b["tokens"])
