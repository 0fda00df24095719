"""Tokenizers. Byte-level: ids 0..255 are the bytes, then BOS and EOS."""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens; vocab 256 bytes + BOS (256) + EOS (257)."""

  bos_id = 256
  eos_id = 257
  vocab_size = 258

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def num_bytes(self, ids) -> int:
    """How many bytes of original text the ids stand for (for bits per byte)."""
    return int(np.sum(np.asarray(ids) < 256))


def get_tokenizer(name: str):
  if name == "byte":
    return ByteTokenizer()
  raise ValueError(f"data.tokenizer={name!r} is not supported (supported: byte)")
