"""The tiny model with a byte-level BPE tokenizer (4096 tokens) trained on the embedded corpus,
with no download. Make the tokenizer file once (about a minute on 2 CPU cores), then train:

  python -m lmtrain.tokenizer train --vocab_size 4096 --out runs/tokenizer/stdlib-bpe-4096.json
  python -m lmtrain.train --config configs/tiny_bpe.py --workdir runs/tiny-bpe
  python -m lmtrain.evaluate --workdir runs/tiny-bpe

Variants: `:attention=NAME` as in configs/tiny.py, `:tokenizer=PATH` for another tokenizer.json
or SentencePiece .model. model.vocab_size is 0: the tokenizer's vocabulary (padded up to a
multiple of 128). A row of 256 tokens holds about 3x the text of the byte-level model's.
"""
from configs import tiny
from lmtrain import config as config_lib

TOKENIZER = "runs/tokenizer/stdlib-bpe-4096.json"


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, attention="softmax", tokenizer=TOKENIZER)
  c = tiny.get_config(f"attention={variant.attention}")
  c.model.vocab_size = 0
  c.data.tokenizer = variant.tokenizer
  return c
