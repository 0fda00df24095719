"""The decoder-only model whose attention is a config choice."""
from lmtrain.model.transformer import ModelDims, Transformer, layer_kinds

__all__ = ["ModelDims", "Transformer", "layer_kinds"]
