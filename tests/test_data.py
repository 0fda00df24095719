"""The grain pipeline: determinism, resumable state, packing, alignment, sources and the held-out
split, held-out rows, bounded memory on one huge document."""
import json
import os
import tracemalloc

import numpy as np
import pytest

from lmtrain.data import (ByteTokenizer, DataError, heldout_batches, open_corpus, packed_dataset,
                          set_iterator_state, train_dataset)
from lmtrain.data.heldout import heldout_stream
from lmtrain.data.jsonl import JsonlCorpus
from lmtrain.data.sources import stdlib_files
from tests.conftest import small_config

TOK = ByteTokenizer()


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


def _jsonl(path, docs):
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return str(path)


def _rows(corpus, seq_len, **kw):
  out = []
  for batch in packed_dataset(corpus, TOK, seq_len=seq_len, batch_size=1, seed=None,
                              repeat=False, **kw):
    out.append({k: v[0] for k, v in batch.items()})
  return out


def _segments(rows):
  """(start index in row, inputs, targets, positions) of every segment of every row."""
  out = []
  for row in rows:
    seg = row["segment_ids"]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments are contiguous"
      out.append((idx[0], row["tokens"][idx], row["targets"][idx], row["positions"][idx]))
    assert np.all(row["loss_mask"] == (seg > 0))
    assert np.all(row["tokens"][seg == 0] == 0) and np.all(row["targets"][seg == 0] == 0)
  return out


@pytest.mark.parametrize("piece_bytes", [1 << 20, 7])
def test_packing_rows_hold_whole_documents_in_order(tmp_path, piece_bytes):
  """Every document's BOS + bytes + EOS, in order and none dropped, whatever the pieces."""
  docs = ["alpha beta", "x" * 50, "gamma", "", "delta epsilon zeta", "é ü 中文 " * 3]
  corpus = JsonlCorpus([_jsonl(tmp_path / "docs.jsonl", docs)], "text", None, 5, TOK,
                       piece_bytes)
  segments = _segments(_rows(corpus, 16))
  for _, tokens, targets, positions in segments:
    assert np.array_equal(positions, np.arange(len(tokens))), "positions restart"
    assert np.array_equal(tokens[1:], targets[:-1])
  expected = [[TOK.bos_id, *TOK.encode(d), TOK.eos_id] for d in docs]
  assert np.array_equal(np.concatenate([s[1] for s in segments]),
                        np.concatenate([e[:-1] for e in expected]))
  assert np.array_equal(np.concatenate([s[2] for s in segments]),
                        np.concatenate([e[1:] for e in expected]))


def test_align_documents_starts_every_document_at_a_multiple(tmp_path):
  docs = [f"doc {i} " + "w" * (i * 7 % 23) for i in range(40)]
  corpus = JsonlCorpus([_jsonl(tmp_path / "d.jsonl", docs)], "text", None, 5, TOK, 1 << 20)
  rows = _rows(corpus, 32, align=8)
  segments = _segments(rows)
  starts = [start for start, tokens, _, _ in segments if tokens[0] == TOK.bos_id]
  assert len(starts) == len(docs) and all(s % 8 == 0 for s in starts)
  assert sum(int(r["loss_mask"].sum()) for r in rows) == sum(len(d) + 1 for d in docs)
  assert any((r["segment_ids"] == 0).any() for r in rows)  # the gaps are padding


def test_stdlib_split_is_disjoint_deterministic_and_keeps_families_together():
  cfg = small_config()
  train = open_corpus(cfg.data, "train").units
  held = open_corpus(cfg.data, "heldout").units
  everything = [p for _, p in stdlib_files()]
  assert set(train).isdisjoint(held) and sorted(train + held) == sorted(everything)
  assert 0.01 < len(held) / len(everything) < 0.15  # heldout_percent = 5
  assert open_corpus(cfg.data, "heldout").units == held
  assert all("site-packages" not in p for p in train)
  root = os.path.commonpath(everything)
  for family in ("encodings/",):  # one split for the whole generated-codec family
    members = [p for p in everything if os.path.relpath(p, root).startswith(family)]
    assert len(members) > 10 and (set(members) <= set(train) or set(members) <= set(held))


def test_text_source_directory_and_eval_path(tmp_path):
  (tmp_path / "train").mkdir()
  for i in range(3):
    (tmp_path / "train" / f"{i}.txt").write_text(f"document number {i}\n" * 20)
  (tmp_path / "held.txt").write_text("held out text\n" * 200)
  cfg = small_config(**{"data.source": "text", "data.path": str(tmp_path / "train"),
                        "data.eval_path": str(tmp_path / "held.txt"), "data.batch_size": 2})
  assert len(open_corpus(cfg.data, "train").units) == 3
  assert len(open_corpus(cfg.data, "heldout").units) == 1
  batch = next(iter(train_dataset(cfg)))
  assert batch["tokens"].shape == (2, 64)
  assert TOK.decode(batch["tokens"][0]).count("document number") >= 1
  held = heldout_batches(cfg)
  assert "held out text" in TOK.decode(held[0]["tokens"][0])


def test_heldout_tokens_come_from_many_documents_in_a_fixed_order():
  cfg = small_config()
  tokens, segments = heldout_stream(cfg, 8192, doc_tokens=64)
  again, _ = heldout_stream(cfg, 8192, doc_tokens=64)
  assert np.array_equal(tokens, again) and len(tokens) == 8193
  starts = np.sum(tokens == TOK.bos_id)
  assert starts >= 16  # spans of at least 16 documents, not the first few files in path order
  cfg.eval.seed = 1
  other, _ = heldout_stream(cfg, 8192, doc_tokens=64)
  assert not np.array_equal(tokens, other)
  rows = heldout_batches(cfg)
  assert len(rows) == cfg.data.eval_batches and rows[0]["tokens"].shape == (8, 64)
  assert all(np.all(r["loss_mask"] <= (r["segment_ids"] > 0)) for r in rows)


def test_heldout_split_too_small_is_one_line(tmp_path):
  (tmp_path / "a.txt").write_text("train text\n" * 100)
  (tmp_path / "h.txt").write_text("tiny")
  cfg = small_config(**{"data.source": "text", "data.path": str(tmp_path / "a.txt"),
                        "data.eval_path": str(tmp_path / "h.txt")})
  with pytest.raises(DataError, match="too few for one batch of 8 x 64"):
    heldout_batches(cfg)


def test_process_shards_are_disjoint():
  cfg = small_config()
  a = next(iter(train_dataset(cfg, process_index=0, process_count=2)))
  b = next(iter(train_dataset(cfg, process_index=1, process_count=2)))
  assert a["tokens"].shape == (4, 64)
  assert not np.array_equal(a["tokens"], b["tokens"])


def test_one_huge_document_streams_in_bounded_memory(tmp_path):
  """A 24 MB single-document corpus: the pipeline holds one piece at a time, so its peak
  allocation stays a few MiB and does not grow as it reads on (the old pipeline held whole
  tokenized copies of the document: about 100 MB each)."""
  line = b"".join(b"line %d of one very long document: lorem ipsum dolor sit amet\n" % i
                  for i in range(20000))
  big = tmp_path / "big.txt"
  with open(big, "wb") as f:
    for _ in range(24 * 2 ** 20 // len(line) + 1):
      f.write(line)
  cfg = small_config(**{"data.source": "text", "data.path": str(big),
                        "data.eval_path": str(big), "data.piece_bytes": 1 << 16})
  it = iter(train_dataset(cfg))

  def consume(n):
    for _ in range(n):
      next(it)

  consume(10)
  tracemalloc.start()
  try:
    consume(300)  # about 2 pieces of 64 KiB
    _, first_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    consume(900)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert first_peak < 4 * 2 ** 20 and peak < 4 * 2 ** 20, (first_peak, peak)
  assert peak < 1.5 * first_peak  # no growth with the amount read
