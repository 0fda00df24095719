"""The decoder-only model whose attention is a config choice (token mixers: lmtrain.model.mixers)."""
from lmtrain.model.dims import ModelDims, layer_kinds
from lmtrain.model.transformer import Transformer

__all__ = ["ModelDims", "Transformer", "layer_kinds"]
