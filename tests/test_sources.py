"""Sources at scale: JSON lines (lazy 1 MiB units), Parquet (row groups) and prepared ArrayRecord
shards yield the documents a plain Python read finds, shard disjointly over hosts, resume
exactly mid-epoch; prepare reproduces the raw batches; the held-out split ignores how the path
is spelled; bad data fails in one line before anything compiles."""
import json
import os

import numpy as np
import pytest

from lmtrain import config as config_lib
from lmtrain.data import DataError, heldout_batches, open_corpus, set_iterator_state, train_dataset
from lmtrain.data import jsonl as jsonl_lib
from lmtrain.data.heldout import heldout_stream
from lmtrain.data.packing import PackedRows
from lmtrain.data.prepare_jobs import prepare
from lmtrain.data.tokenizers import ByteTokenizer
from tests.conftest import small_config

TOK = ByteTokenizer()


def _documents(n=400, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "δέλτα", "ε", "中文", "x" * 40, "\n", "{json}", '"q"']
  return [" ".join(rng.choice(words, size=int(rng.integers(0, 120)))) for _ in range(n)]


@pytest.fixture
def small_units(monkeypatch):
  """JSON lines units of 2 KiB, so that a small file has many of them (and lines that cross)."""
  monkeypatch.setattr(jsonl_lib, "CHUNK_BYTES", 2048)


def _write_jsonl(path, docs, extra=False):
  with open(path, "w") as f:
    for i, d in enumerate(docs):
      record = {"id": i, "text": d} if extra else {"text": d}
      f.write(json.dumps(record, ensure_ascii=i % 2 == 0) + ("\n\n" if i % 50 == 7 else "\n"))
  return str(path)


def _write_parquet(path, docs, row_group_size=37, column="text"):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path,
                 row_group_size=row_group_size)
  return str(path)


def _corpus_docs(data_cfg, split):
  corpus = open_corpus(data_cfg, split, TOK)
  out = []
  for ref in corpus.units:
    unit = corpus.open(ref)
    for i in range(unit.num_docs):
      out.append(b"".join(TOK.decode_bytes(p.tokens) for p in unit.doc(i).pieces()))
  return out


def _cfg(source, path, **kw):
  return small_config(**{"data.source": source, "data.path": path, "data.batch_size": 4,
                         "data.eval_batches": 1, "data.shuffle_window": 16, **kw})


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_sources_yield_the_documents_of_a_plain_read(tmp_path, small_units, source):
  docs = _documents()
  path = (_write_jsonl(tmp_path / "d.jsonl", docs, extra=True) if source == "jsonl"
          else _write_parquet(str(tmp_path / "d.parquet"), docs))
  cfg = _cfg(source, path, **{"data.piece_bytes": 256})
  corpus = open_corpus(cfg.data, "train", TOK)
  assert len(corpus.units) > 10  # many units: 2 KiB ranges or row groups of 37
  train, held = _corpus_docs(cfg.data, "train"), _corpus_docs(cfg.data, "heldout")
  plain = [d.encode("utf-8") for d in docs]  # the plain Python read
  assert sorted(train + held) == sorted(plain)
  assert 0 < len(held) < 0.15 * len(plain)


@pytest.mark.parametrize("source", ["jsonl", "parquet", "arrayrecord"])
def test_sources_shard_disjointly_and_resume_exactly_mid_epoch(tmp_path, small_units, source):
  docs = _documents(150)
  if source == "parquet":
    path = _write_parquet(str(tmp_path / "d.parquet"), docs, row_group_size=10)
  else:
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
  cfg = _cfg("jsonl" if source == "arrayrecord" else source, path,
             **{"data.piece_bytes": 300})
  if source == "arrayrecord":
    prepare(cfg, str(tmp_path / "shards"), workers=1, progress=False)
    cfg = _cfg("arrayrecord", str(tmp_path / "shards"))
  corpus = open_corpus(cfg.data, "train", TOK)
  hosts = [PackedRows(corpus, seq_len=64, bos_id=256, eos_id=257, seed=0, repeat=False,
                      process_index=i, process_count=2) for i in range(2)]
  assert set(hosts[0].units).isdisjoint(hosts[1].units)
  assert sorted(hosts[0].units + hosts[1].units) == sorted(corpus.units)
  scored = [sum(int(r["loss_mask"].sum()) for r in h) for h in hosts]
  whole = sum(int(r["loss_mask"].sum()) for r in PackedRows(corpus, seq_len=64, bos_id=256,
                                                             eos_id=257, seed=0, repeat=False))
  assert scored[0] > 0 and scored[1] > 0 and sum(scored) == whole
  # An epoch here is ~40 batches: states mid-epoch, mid-piece and past the first epoch.
  for consumed in (3, 17, 45, 101):
    it = iter(train_dataset(cfg))
    for _ in range(consumed):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = iter(train_dataset(cfg))
    set_iterator_state(resumed, state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
      assert all(np.array_equal(a[k], b[k]) for k in a), consumed


def test_prepare_reproduces_the_raw_batches_and_losses(tmp_path, small_units):
  import jax
  from lmtrain.trainer import Trainer
  path = _write_jsonl(tmp_path / "d.jsonl", _documents(300))
  raw = _cfg("jsonl", path, **{"data.piece_bytes": 512})
  out = str(tmp_path / "shards")
  manifest = prepare(raw, out, workers=1, progress=False)
  assert manifest["splits"]["train"]["units"] == len(open_corpus(raw.data, "train").units)
  # Interrupted after one job: a second run does the rest and writes the same manifest.
  os.remove(os.path.join(out, "manifest.json"))
  os.remove(os.path.join(out, "train", "shard-00000.json"))
  assert prepare(raw, out, workers=1, progress=False) == manifest
  other = _cfg("jsonl", path, **{"data.piece_bytes": 1024})
  with pytest.raises(DataError, match="holds a prepare of other data"):
    prepare(other, out, workers=1, progress=False)
  pre = _cfg("arrayrecord", out)
  a, b = iter(train_dataset(raw)), iter(train_dataset(pre))
  batches = []
  for _ in range(60):  # past the end of the first epoch
    x, y = next(a), next(b)
    assert all(np.array_equal(x[k], y[k]) for k in x)
    batches.append(x)
  for x, y in zip(heldout_batches(raw), heldout_batches(pre)):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  raw.model.num_layers = pre.model.num_layers = 1  # a quick compile; the batches decide
  trainer = Trainer.from_config(raw)
  step = jax.jit(trainer.train_step)
  losses = {}
  for name, cfg in (("raw", raw), ("prepared", pre)):
    state = jax.jit(trainer.init_state, static_argnums=0)(0)
    it = iter(train_dataset(cfg))
    losses[name] = []
    for _ in range(3):
      state, m = step(state, next(it))
      losses[name].append(float(m["loss"]))
  assert losses["raw"] == losses["prepared"]


def _spellings(tmp_path, monkeypatch, target):
  """The same path as typed from elsewhere: absolute, relative, through a symlink, and relative
  from another working directory."""
  link = tmp_path / "link"
  os.symlink(target, link)
  (tmp_path / "elsewhere").mkdir()
  yield str(target)
  monkeypatch.chdir(tmp_path)
  yield os.path.relpath(target, tmp_path)
  yield "link"
  monkeypatch.chdir(tmp_path / "elsewhere")
  yield os.path.join("..", "link")


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_heldout_split_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch,
                                                                  small_units, source):
  data = tmp_path / "data"
  data.mkdir()
  docs = _documents(200, seed=3)
  if source == "text":
    for i, d in enumerate(docs):
      (data / f"doc{i:03d}.txt").write_text(d + "!")
    (data / "sub").mkdir()
    (data / "sub" / "deep.txt").write_text("deep " * 100)
    target = data
  else:
    target = data / "d.jsonl"
    _write_jsonl(target, docs)
  streams = []
  for path in _spellings(tmp_path, monkeypatch, target):
    cfg = _cfg(source, path, **{"data.heldout_percent": 10})
    tokens, _ = heldout_stream(cfg, 4096)
    streams.append((tokens, next(iter(train_dataset(cfg)))["tokens"]))
  for tokens, batch in streams[1:]:
    assert np.array_equal(tokens, streams[0][0]) and np.array_equal(batch, streams[0][1])


def test_text_families_keep_near_duplicates_in_one_split(tmp_path):
  for i in range(300):
    (tmp_path / f"cp{i}.txt").write_text(f"code page {i}")
    (tmp_path / f"other_{chr(97 + i % 26)}{chr(97 + i // 26)}.txt").write_text("x")
  cfg = _cfg("text", str(tmp_path), **{"data.heldout_percent": 30})
  train = open_corpus(cfg.data, "train", TOK).units
  held = open_corpus(cfg.data, "heldout", TOK).units
  family = [u for u in train + held if os.path.basename(u).startswith("cp")]
  assert len(family) == 300 and (set(family) <= set(train) or set(family) <= set(held))


# ---- bad data: one line, before anything compiles ---------------------------------------------

def test_malformed_line_deep_in_a_corpus_names_file_and_line_or_is_skipped(tmp_path, capsys,
                                                                            small_units):
  lines = [json.dumps({"text": d}) for d in _documents(300)]
  lines[250] = '{"text": "broken'
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n")
  cfg = _cfg("jsonl", str(path), **{"data.heldout_percent": 1})
  it = iter(train_dataset(cfg))  # the first records are fine: it starts
  with pytest.raises(DataError, match=rf"^{path}:251: malformed JSON line"):
    for _ in range(200):
      next(it)
  cfg.data.skip_bad_records = True
  it = iter(train_dataset(cfg))
  for _ in range(200):
    next(it)
  assert it.get_state()["window_start"]["skipped"] >= 1
  assert f"skipped a bad record (1 so far; data.skip_bad_records): {path}:251" in (
      capsys.readouterr().err)


def test_bad_data_fails_before_training_in_one_line(tmp_path):
  (tmp_path / "notes.md").write_text("no txt here")
  with pytest.raises(DataError, match=r"matches no \.txt file"):
    train_dataset(_cfg("text", str(tmp_path)))
  path = tmp_path / "d.jsonl"
  path.write_text('{"body": "no text field"}\n' * 50)
  with pytest.raises(DataError, match=rf"^{path}:1: no field 'text'"):
    train_dataset(_cfg("jsonl", str(path)))
  pq_path = _write_parquet(str(tmp_path / "d.parquet"), _documents(20), column="content")
  with pytest.raises(DataError, match=r"d\.parquet has no column 'text' .*content"):
    train_dataset(_cfg("parquet", pq_path))


def test_bad_shards_and_tokenizers_fail_before_compiling(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(config_lib.ConfigError, match="has no manifest.json"):
    _cfg("arrayrecord", str(tmp_path / "empty"))
  with pytest.raises(config_lib.ConfigError, match="missing.json' does not exist"):
    small_config(**{"data.tokenizer": str(tmp_path / "missing.json")})
  raw = _cfg("jsonl", _write_jsonl(tmp_path / "d.jsonl", _documents(100)))
  out = str(tmp_path / "shards")
  prepare(raw, out, workers=1, progress=False)
  shard = os.path.join(out, "train", "shard-00000.array_record")
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:  # garbage over the file, same size
    f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
  with pytest.raises(DataError, match="shard-00000.array_record: corrupt ArrayRecord shard"):
    train_dataset(_cfg("arrayrecord", out))
  with open(shard, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(DataError, match="truncated or replaced"):
    train_dataset(_cfg("arrayrecord", out))
