"""Tokenizers: byte, Hugging Face tokenizer.json and SentencePiece round-trip text; the BPE
trainer is deterministic; BOS/EOS and the vocabulary come from the tokenizer; bits per byte of
any tokenizer count the decoded bytes of the scored tokens."""
import io
import json
import math

import numpy as np
import pytest

from lmtrain import config as config_lib
from lmtrain.data import tokenizers as tok_lib
from lmtrain.data.tokenizers import ByteTokenizer, TokenizerError, get_tokenizer
from lmtrain.evals.perplexity import perplexity
from lmtrain.evals.scoring import Scorer
from lmtrain.tokenizer import main as tokenizer_main
from lmtrain.tokenizer import train_bpe
from tests.conftest import small_config

TEXTS = ["Hello, world! Ünïcödé façade — naïve café.\n",
         "def f(x):\n    return x ** 2  # 平方\n",
         "emoji 😀 and tabs\tand  double  spaces\n",
         "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "bpe.json"
  train_bpe(TEXTS * 20, 400).save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS * 20), model_writer=model, vocab_size=400,
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_by_whitespace=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  path = tmp_path_factory.mktemp("sp") / "sp.model"
  path.write_bytes(model.getvalue())
  return str(path)


def test_byte_tokenizer_round_trips_any_bytes():
  tok = ByteTokenizer()
  data = "naïve 中文 😀".encode() + b"\xff\xfe invalid \xc3"
  ids = tok.encode(data)
  assert ids.dtype == np.int32 and len(ids) == len(data)
  assert tok.decode_bytes(ids) == data and tok.num_bytes(ids) == len(data)
  assert tok.decode(tok.encode("naïve 中文 😀")) == "naïve 中文 😀"
  assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id]) == "ab"


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
def test_file_tokenizers_round_trip_text_and_count_bytes(which, bpe_path, sp_path):
  tok = get_tokenizer(bpe_path if which == "bpe" else sp_path)
  for text in TEXTS + ["ζ ∑ ∫ — “quotes” 漢字 🙂"]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and np.all(ids < tok.vocab_size)
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode()) + (which == "sentencepiece")  # "▁" prefix
  assert tok.decode([tok.bos_id, *tok.encode("abc"), tok.eos_id]) == "abc"
  assert (tok.bos_id, tok.eos_id) == ((0, 1) if which == "bpe" else (1, 2))
  assert len(tok.sha256) == 64 and get_tokenizer(bpe_path if which == "bpe" else sp_path) is tok


def test_bpe_training_is_deterministic_and_the_command_writes_it(tmp_path):
  data = tmp_path / "corpus"
  data.mkdir()
  for i, text in enumerate(TEXTS * 10):
    (data / f"{i:02d}.txt").write_text(text * 3)
  files = []
  for name in ("a.json", "b.json"):
    assert tokenizer_main(["train", "--input", str(data), "--vocab_size", "320", "--out",
                           str(tmp_path / name), "--heldout_percent", "0"]) == 0
    files.append((tmp_path / name).read_bytes())
  assert files[0] == files[1]
  spec = json.loads(files[0])
  assert len(spec["model"]["vocab"]) == 320 and spec["decoder"]["type"] == "ByteLevel"
  assert tokenizer_main(["train", "--vocab_size", "100", "--out", str(tmp_path / "c")]) == 2


def test_bos_eos_come_from_the_tokenizer(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  def make(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / f"{len(specials)}" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path)
  gpt2 = get_tokenizer(make(["<|endoftext|>"]))  # one end-of-text token serves as both
  assert gpt2.bos_id == gpt2.eos_id == 0
  with pytest.raises(TokenizerError, match="no end-of-text special token"):
    get_tokenizer(make([]))
  path = make(["<pad>", "<s>", "</s>", "<eot>"])
  with open(tmp_path / "4" / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": {"content": "<eot>"}}, f)
  tok = get_tokenizer(path)
  assert (tok.bos_id, tok.eos_id) == (1, 3)


def test_vocab_size_is_checked_or_derived(bpe_path):
  n = get_tokenizer(bpe_path).vocab_size
  assert 258 < n <= 400
  cfg = small_config(**{"data.tokenizer": bpe_path, "model.vocab_size": 0})
  assert cfg.model.vocab_size == (384 if n <= 384 else 512)  # padded to a multiple of 128
  with pytest.raises(config_lib.ConfigError, match=rf"model.vocab_size=258 is smaller than the "
                                                   rf"tokenizer's {n} ids"):
    small_config(**{"data.tokenizer": bpe_path})
  assert small_config(**{"model.vocab_size": 0}).model.vocab_size == 384  # byte: 258 -> 384


class _FixedDistribution:
  """A constructed model: the same next-token distribution p = softmax(logits) everywhere."""

  def __init__(self, vocab):
    self.logits = np.log(np.arange(1, vocab + 1, dtype=np.float64) ** 0.5)
    self.logp = self.logits - np.log(np.sum(np.exp(self.logits)))

  def scorer(self):
    logits = self.logits.astype(np.float32)
    return Scorer(lambda params, tokens, seg: np.broadcast_to(logits, tokens.shape + logits.shape),
                  jit=False)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_bits_per_byte_is_the_hand_computation_for_any_tokenizer(tmp_path, which, bpe_path):
  """Known per-token probabilities: bits per byte = sum over scored targets of -log2 p(target)
  / the bytes those targets decode to (BOS/EOS: no bytes; no target across documents)."""
  docs = tmp_path / "docs"
  docs.mkdir()
  for i, text in enumerate(TEXTS):
    (docs / f"{i}.txt").write_text(text)
  spec = "byte" if which == "byte" else bpe_path
  cfg = small_config(**{"data.source": "text", "data.path": str(docs),
                        "data.eval_path": str(docs), "data.tokenizer": spec,
                        "model.vocab_size": 0})
  tok = get_tokenizer(spec)
  model = _FixedDistribution(tok.vocab_size)
  r = perplexity(model.scorer(), None, cfg, window=16, max_tokens=100000, batch_size=4)
  from lmtrain.data.heldout import disjoint_windows, heldout_stream
  tokens, segments = heldout_stream(cfg, 100000, doc_tokens=16)
  nll = nbytes = 0.0
  for _, targets, _, score in disjoint_windows(tokens, segments, 16):
    nll -= np.sum(model.logp[targets[score]])
    nbytes += len(b"".join(tok.decode_bytes([t]) for t in targets[score]))
  assert r["disjoint"]["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
  whole = sum(len(t.encode()) for t in TEXTS)  # every document is scored whole here
  assert r["disjoint"]["bytes"] <= whole and r["disjoint"]["bytes"] > 0.8 * whole
  assert tok_lib.get_tokenizer(spec).num_bytes(tok.encode(TEXTS[0])) == len(TEXTS[0].encode())


def test_passkey_prompt_in_token_space_of_a_bpe_tokenizer(bpe_path):
  from lmtrain.evals import needle
  tok = get_tokenizer(bpe_path)
  filler = tok.encode(needle.SYNTHETIC_FILLER)
  for length, depth in ((96, 0.0), (200, 0.5), (300, 1.0)):
    s = needle.make_sample(tok, length=length, depth=depth, key=48213, filler_ids=filler)
    assert len(s.tokens) == length + 1
    answer = s.tokens[1:][s.answer_slice]
    assert tok.decode(answer).strip() == "48213"  # a merged leading space belongs to it
    tail = s.tokens[-(len(answer) + 40):]
    assert tok.decode(tail).endswith(needle.QUESTION + "48213")
    assert tok.decode(s.tokens[s.needle_start:]).startswith("The pass key is 48213.")
  question, answer = needle.question_and_answer(tok, "48213")
  assert np.array_equal(np.concatenate([question, answer]),
                        tok.encode(needle.QUESTION + "48213"))
