"""Data: sources, tokenizers, the streaming packer, grain pipelines, prepared shards."""
from lmtrain.data.errors import DataError
from lmtrain.data.pipeline import (heldout_batches, packed_dataset, set_iterator_state,
                                   train_dataset)
from lmtrain.data.sources import open_corpus
from lmtrain.data.tokenizers import ByteTokenizer, get_tokenizer

__all__ = ["ByteTokenizer", "DataError", "get_tokenizer", "heldout_batches", "open_corpus",
           "packed_dataset", "set_iterator_state", "train_dataset"]
