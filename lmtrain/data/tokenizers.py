"""Tokenizers, chosen by data.tokenizer: `byte` (default), a Hugging Face `tokenizer.json`, or a
SentencePiece `.model` file. Nothing is ever downloaded: a subword tokenizer is a local file
(`python -m lmtrain.tokenizer train` makes one from any lmtrain source).

Every tokenizer has the same interface:
  encode(text: bytes | str) -> int32 [N]   the ids of the text, without BOS/EOS
  decode(ids) -> str                       specials dropped, invalid UTF-8 replaced
  decode_bytes(ids) -> bytes               the text bytes the ids stand for
  num_bytes(ids) -> int                    len(decode_bytes(ids)), from a per-id table
  bos_id, eos_id, vocab_size (every id is < vocab_size), sha256 (the file's hash; "byte")

Bits per byte count `num_bytes` of the scored targets: each token's own decoded bytes (BOS/EOS
and other specials count 0). This is exact for the byte tokenizer, byte-level BPE and
byte-fallback pieces; for SentencePiece word pieces the "▁" that marks a word start counts as
the space it stands for, so the dummy prefix of each document's first word counts one byte.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import numpy as np

# Special tokens recognised as BOS / EOS in a tokenizer.json without a tokenizer_config.json.
BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]")
EOS_NAMES = ("<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[EOS]")
VOCAB_MULTIPLE = 128  # model.vocab_size=0 pads the tokenizer's vocabulary up to this multiple


class TokenizerError(ValueError):
  """A tokenizer file that cannot be used; one line."""


class ByteTokenizer:
  """UTF-8 bytes as tokens; vocab 256 bytes + BOS (256) + EOS (257)."""

  name = "byte"
  bos_id = 256
  eos_id = 257
  vocab_size = 258
  sha256 = "byte"

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode_bytes(self, ids) -> bytes:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes()

  def decode(self, ids) -> str:
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def num_bytes(self, ids) -> int:
    """How many bytes of original text the ids stand for (for bits per byte)."""
    return int(np.sum(np.asarray(ids) < 256))


class _TableTokenizer:
  """Shared by the file tokenizers: a bytes table per id gives decode_bytes and num_bytes."""

  name: str
  bos_id: int
  eos_id: int
  vocab_size: int
  sha256: str
  _bytes: list  # bytes of each id ([vocab_size]; b"" for specials)
  _lengths: np.ndarray  # int64 [vocab_size]

  def _set_table(self, table: list) -> None:
    self._bytes = table
    self._lengths = np.asarray([len(b) for b in table], np.int64)

  def decode_bytes(self, ids) -> bytes:
    return b"".join(self._bytes[int(i)] for i in np.asarray(ids).ravel())

  def num_bytes(self, ids) -> int:
    return int(np.sum(self._lengths[np.asarray(ids, np.int64)]))


def _gpt2_byte_decoder() -> dict:
  """The byte-level BPE alphabet (GPT-2's bytes_to_unicode), inverted: char -> byte."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(spec: dict | None) -> set:
  if not spec:
    return set()
  if spec.get("type") == "Sequence":
    return set().union(*(_decoder_types(d) for d in spec.get("decoders", [])))
  return {spec.get("type")}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _piece_bytes(piece: str, word_piece: bool) -> bytes:
  """A SentencePiece-style piece's text: "▁" is a space, <0xHH> one byte."""
  m = _BYTE_PIECE.match(piece)
  if m:
    return bytes([int(m.group(1), 16)])
  if word_piece and piece.startswith("##"):
    piece = piece[2:]
  return piece.replace("▁", " ").encode("utf-8")


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


class HFTokenizer(_TableTokenizer):
  """A Hugging Face `tokenizer.json` (the `tokenizers` library). BOS/EOS: the tokenizer_config.json
  beside it when there is one, else the first special token named like one (BOS_NAMES /
  EOS_NAMES); a tokenizer with only an end-of-text token (GPT-2) uses it for both."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    try:
      self._tok = Tokenizer.from_file(path)
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    except Exception as e:  # the library's errors are long; keep their first line
      raise TokenizerError(f"{path} is not a tokenizer.json: {str(e).splitlines()[0]}") from e
    self.name = path
    self.sha256 = _file_sha256(path)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    self.bos_id, self.eos_id = self._specials(path, vocab, specials)
    types = _decoder_types(spec.get("decoder"))
    byte_level = "ByteLevel" in types
    byte_decoder = _gpt2_byte_decoder()
    added = {t["id"] for t in spec.get("added_tokens", [])}
    table = [b""] * self.vocab_size
    for token, i in vocab.items():
      if token in specials:
        continue
      if byte_level and i not in added:
        table[i] = bytes(byte_decoder.get(c, 0) for c in token)
      else:
        table[i] = _piece_bytes(token, "WordPiece" in types)
    self._set_table(table)
    self._byte_level = byte_level

  @staticmethod
  def _specials(path, vocab, specials) -> tuple[int, int]:
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    named = {}
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
      for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in vocab:
          named[key] = vocab[value]
    bos = named.get("bos_token", next((specials[n] for n in BOS_NAMES if n in specials), None))
    eos = named.get("eos_token", next((specials[n] for n in EOS_NAMES if n in specials), None))
    if eos is None:
      raise TokenizerError(f"{path} has no end-of-text special token (looked for "
                           f"{', '.join(EOS_NAMES)}); add one as a special token")
    return (eos if bos is None else bos), eos

  def encode(self, text: str | bytes) -> np.ndarray:
    if not isinstance(text, str):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).ravel()]
    if self._byte_level:
      return self.decode_bytes(ids).decode("utf-8", errors="replace")
    return self._tok.decode(ids, skip_special_tokens=True)


class SentencePieceTokenizer(_TableTokenizer):
  """A SentencePiece `.model` file (the `sentencepiece` library); BOS/EOS are the model's (a
  model without a BOS uses its EOS for both)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:
      raise TokenizerError(f"{path} is not a SentencePiece model: "
                           f"{str(e).splitlines()[0]}") from e
    sp = self._sp
    self.name = path
    self.sha256 = _file_sha256(path)
    self.vocab_size = sp.get_piece_size()
    if sp.eos_id() < 0:
      raise TokenizerError(f"{path} has no end-of-sentence id (train it with eos_id >= 0)")
    self.eos_id = sp.eos_id()
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else self.eos_id
    table = []
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        table.append(b"")
      elif sp.is_byte(i):
        table.append(_piece_bytes(sp.id_to_piece(i), False))
      else:
        table.append(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
    self._set_table(table)

  def encode(self, text: str | bytes) -> np.ndarray:
    if not isinstance(text, str):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).ravel()])


_BYTE = ByteTokenizer()


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # part of the cache key: an edited file is loaded again
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  with open(path, "rb") as f:
    head = f.read(64).lstrip()
  return HFTokenizer(path) if head.startswith(b"{") else SentencePieceTokenizer(path)


def get_tokenizer(spec: str):
  """The tokenizer of data.tokenizer: "byte", or a path to a tokenizer.json / .model file.
  Raises TokenizerError (one line) for a missing or unusable file."""
  if spec == "byte":
    return _BYTE
  if not isinstance(spec, str) or not spec:
    raise TokenizerError(f"{spec!r} is not byte or a tokenizer file")
  path = os.path.abspath(spec)
  try:
    st = os.stat(path)
  except OSError:
    raise TokenizerError(f"{spec!r} does not exist (give byte, a tokenizer.json or a "
                         "SentencePiece .model file; python -m lmtrain.tokenizer train "
                         "makes one)") from None
  if not os.path.isfile(path):
    raise TokenizerError(f"{spec!r} is not a file")
  return _load(path, st.st_mtime_ns, st.st_size)


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
  """n rounded up to a multiple (matmul-friendly widths on GPUs and TPUs)."""
  return -(-n // multiple) * multiple
