"""grain pipelines: documents -> tokens -> packed rows with segment ids -> batches.

A batch is a dict of int32 numpy arrays, all [B, T] (BATCH_KEYS):
  tokens (inputs), targets (the next token), segment_ids (0 = padding), positions (within the
  document piece), loss_mask (1 where the target is scored).
Long documents are split across rows (concat-then-split packing); every piece is its own
segment, so attention never crosses a document or a row boundary.
"""
from __future__ import annotations

import grain
import numpy as np

from lmtrain.data.mqar import mqar_dataset
from lmtrain.data.sources import load_documents
from lmtrain.data.tokenizers import get_tokenizer


BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class DocumentToExample(grain.transforms.Map):
  """bytes -> {"inputs": [BOS] + ids, "targets": ids + [EOS]} (next-token pairs)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, document: bytes):
    ids = self.tokenizer.encode(document)
    tokens = np.concatenate([[self.tokenizer.bos_id], ids, [self.tokenizer.eos_id]]).astype(
        np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def _to_model_batch(packed):
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)
  return {
      "tokens": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": segment_ids,
      "positions": packed["inputs_positions"].astype(np.int32),
      "loss_mask": (segment_ids > 0).astype(np.int32),
  }


def packed_dataset(documents, tokenizer, *, seq_len: int, batch_size: int,
                   seed: int | None, shuffle_window: int = 0, process_index: int = 0,
                   process_count: int = 1, repeat: bool = True) -> grain.IterDataset:
  """Batches of packed rows. seed=None keeps document order (evaluation).

  Documents are shuffled, then rows are shuffled within windows of `shuffle_window` rows: one
  long document fills many consecutive rows, and a batch should not be one file.
  """
  ds = grain.MapDataset.source(documents)
  if process_count > 1:
    ds = ds[process_index::process_count]  # each host reads its own documents
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()  # reshuffled every epoch
  ds = ds.map(DocumentToExample(tokenizer))
  it = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"inputs": seq_len, "targets": seq_len})
  if seed is not None and shuffle_window > 1:
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed)
  it = it.batch(batch_size, drop_remainder=True)
  return it.map(_to_model_batch)


def mqar_options(data_cfg) -> dict:
  """The generator settings of data.mqar_* (vocabulary, power law, random filler)."""
  return {"vocab_size": data_cfg.mqar_vocab_size, "power_a": data_cfg.mqar_power_a,
          "random_non_queries": data_cfg.mqar_random_non_queries}


# MQAR rows of the held-out split come from another seed than the training rows.
MQAR_HELDOUT_SEED_OFFSET = 1_000_003


def train_dataset(cfg, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training stream of this host: shuffled held-in documents, repeated forever."""
  if cfg.data.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if cfg.data.source == "mqar":
    return mqar_dataset(seed=cfg.train.seed, seq_len=cfg.data.seq_len,
                        num_pairs=cfg.data.mqar_num_pairs,
                        batch_size=cfg.data.batch_size // process_count,
                        process_index=process_index, process_count=process_count,
                        **mqar_options(cfg.data))
  docs = load_documents(cfg.data, "train")
  return packed_dataset(docs, get_tokenizer(cfg.data.tokenizer), seq_len=cfg.data.seq_len,
                        batch_size=cfg.data.batch_size // process_count, seed=cfg.train.seed,
                        shuffle_window=cfg.data.shuffle_window, process_index=process_index, process_count=process_count)


def heldout_batches(cfg, *, num_batches: int | None = None, seq_len: int | None = None,
                    batch_size: int | None = None) -> list[dict]:
  """The first batches of the held-out documents, in a fixed order (the same every call)."""
  n = num_batches or cfg.data.eval_batches
  if cfg.data.source == "mqar":
    bs = batch_size or cfg.data.batch_size
    return list(mqar_dataset(seed=cfg.train.seed + MQAR_HELDOUT_SEED_OFFSET,
                             seq_len=seq_len or cfg.data.seq_len,
                             num_pairs=cfg.data.mqar_num_pairs, batch_size=bs,
                             num_rows=n * bs, **mqar_options(cfg.data)))
  docs = load_documents(cfg.data, "heldout")
  it = packed_dataset(docs, get_tokenizer(cfg.data.tokenizer),
                      seq_len=seq_len or cfg.data.seq_len,
                      batch_size=batch_size or cfg.data.batch_size, seed=None, repeat=False)
  out = []
  for batch in it:
    out.append(batch)
    if len(out) == n:
      break
  if not out:
    raise ValueError(f"held-out split of data.source={cfg.data.source!r} is too small for one "
                     f"batch of {batch_size or cfg.data.batch_size} x {seq_len or cfg.data.seq_len}")
  return out


def _lists_to_tuples(x):
  if isinstance(x, dict):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_lists_to_tuples(v) for v in x)
  return x


def set_iterator_state(iterator, state: dict) -> None:
  """Restores a grain iterator from JSON-loaded state.

  JSON turns tuples into lists, and grain's packing compares its empty-slice sentinel with a
  tuple, so a state that went through JSON must have its tuples back before set_state.
  """
  iterator.set_state(_lists_to_tuples(state))
