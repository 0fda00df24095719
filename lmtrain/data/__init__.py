"""Data: document sources, tokenizers, grain pipelines with packing."""
from lmtrain.data.pipeline import (heldout_batches, packed_dataset, set_iterator_state,
                                   train_dataset)
from lmtrain.data.sources import load_documents
from lmtrain.data.tokenizers import ByteTokenizer, get_tokenizer

__all__ = ["ByteTokenizer", "get_tokenizer", "heldout_batches", "load_documents",
           "packed_dataset", "set_iterator_state", "train_dataset"]
