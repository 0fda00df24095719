"""Train a byte-level BPE tokenizer on any lmtrain source, with no download:

  python -m lmtrain.tokenizer train --vocab_size 4096 --out runs/tokenizer/stdlib-bpe.json
  python -m lmtrain.tokenizer train --input corpus/ data.jsonl --vocab_size 32000 --out tok.json

Without --input it trains on the embedded corpus (the standard library's sources). Inputs are
text files, directories of .txt files, globs, JSON lines (.jsonl/.json, field --text_field) or
Parquet (.parquet) files. Only the training split of each input is read (--heldout_percent, as
data.heldout_percent: the held-out documents never shape the tokenizer; 0 reads everything).
The result is a Hugging Face tokenizer.json (the GPT-2 byte-level alphabet, so every byte
sequence round-trips; special tokens <|bos|> = 0 and <|eos|> = 1) for data.tokenizer. Training
is deterministic: the same inputs give the same file.
"""
from __future__ import annotations

import argparse
import os
import sys

import ml_collections

from lmtrain.data.errors import DataError
from lmtrain.data.sources import raw_corpus
from lmtrain.data.tokenizers import ByteTokenizer

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")


def _source_of(path: str) -> str:
  if path.endswith((".jsonl", ".json")):
    return "jsonl"
  if path.endswith(".parquet"):
    return "parquet"
  return "text"


def corpus_texts(inputs, *, text_field: str = "text", heldout_percent: float = 5.0,
                 piece_bytes: int = 1 << 20):
  """The training-split text of the inputs (default: the embedded corpus), piece by piece."""
  byte = ByteTokenizer()
  specs = [("stdlib", None)] if not inputs else [(_source_of(p), p) for p in inputs]
  for source, path in specs:
    d = ml_collections.ConfigDict({
        "source": source, "path": path, "eval_path": None, "text_field": text_field,
        "heldout_percent": heldout_percent, "piece_bytes": piece_bytes, "tokenizer": "byte"})
    corpus = raw_corpus(d, "train", byte)
    for ref in corpus.units:
      unit = corpus.open(ref)
      for i in range(unit.num_docs):
        for piece in unit.doc(i).pieces():
          yield byte.decode_bytes(piece.tokens).decode("utf-8", errors="replace")


def train_bpe(texts, vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` trained on an iterable of strings."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lmtrain.tokenizer")
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a byte-level BPE tokenizer")
  t.add_argument("--input", nargs="*", default=[],
                 help="text/JSON lines/Parquet files, directories or globs (default: the "
                      "embedded corpus)")
  t.add_argument("--vocab_size", type=int, required=True)
  t.add_argument("--out", required=True, help="the tokenizer.json to write")
  t.add_argument("--text_field", default="text")
  t.add_argument("--heldout_percent", type=float, default=5.0)
  args = parser.parse_args(argv)
  min_vocab = 256 + len(SPECIAL_TOKENS)
  if args.vocab_size < min_vocab:
    print(f"lmtrain: error: --vocab_size={args.vocab_size} must be at least {min_vocab} (the "
          "256 bytes and the special tokens)", file=sys.stderr)
    return 2
  if not 0 <= args.heldout_percent < 100:
    print(f"lmtrain: error: --heldout_percent={args.heldout_percent} must be in [0, 100)",
          file=sys.stderr)
    return 2
  try:
    texts = corpus_texts(args.input, text_field=args.text_field,
                         heldout_percent=args.heldout_percent)
    tok = train_bpe(texts, args.vocab_size)
  except DataError as e:
    print(f"lmtrain: error: {e}", file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tok.save(args.out)
  sample = "".join(t for _, t in zip(range(200), corpus_texts(
      args.input, text_field=args.text_field, heldout_percent=args.heldout_percent)))
  ratio = len(sample.encode("utf-8")) / max(len(tok.encode(sample).ids), 1)
  print(f"lmtrain: wrote {args.out}: {tok.get_vocab_size()} tokens, {ratio:.2f} bytes per "
        "token on the training text", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
