"""The tiny default: a ~1M-parameter byte-level LM on the embedded stdlib corpus, sized for CPU.

  python -m lmtrain.train --config configs/tiny.py --workdir runs/tiny
  python -m lmtrain.train --config configs/tiny.py:attention=moba --workdir runs/tiny-moba

Variants (`:attention=NAME`): every attention kind and the ready variants its mixer declares
(`python -m lmtrain.sweep list` prints them).
"""
from lmtrain import config as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, attention="softmax")
  c = config_lib.base_config()
  c.model.update(vocab_size=258, num_layers=4, d_model=128, num_heads=2, num_kv_heads=1,
                 mlp_dim=384, dtype="float32")
  c.data.update(source="stdlib", seq_len=256, batch_size=16)
  c.train.update(steps=300, lr=3e-3, warmup_steps=30, log_every=10, eval_every=100,
                 checkpoint_every=50)
  config_lib.apply_attention_variant(c, variant.attention)
  return c
