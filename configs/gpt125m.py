"""A ~113M-parameter GPT-style model at sequence 4096 for one GPU (bf16, 32k tokens per step):
the MFU benchmark of the trainer.

  python -m lmtrain.train --config configs/gpt125m.py --workdir runs/gpt125m
  python -m lmtrain.train --config configs/gpt125m.py:attention=linear --workdir runs/g-linear

12 layers, width 768, 12 heads of 64, SwiGLU 3072, byte-level vocabulary (258), on the embedded
corpus by default (point data.source/data.path at your own text for real runs).
"""
from lmtrain import config as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, attention="softmax")
  c = config_lib.base_config()
  c.model.update(vocab_size=258, num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                 mlp_dim=3072, dtype="bfloat16", tie_embeddings=False)
  c.data.update(source="stdlib", seq_len=4096, batch_size=8, eval_batches=4, shuffle_window=256)
  c.train.update(steps=2000, lr=6e-4, warmup_steps=200, log_every=20, eval_every=500,
                 checkpoint_every=500, weight_decay=0.1)
  config_lib.apply_attention_variant(c, variant.attention)
  return c
