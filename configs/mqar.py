"""Zoology's MQAR at CPU scale: a 2-layer model trained on multi-query associative recall, the
setting of `python -m lmtrain.mqar_check` (every attention kind, recall by number of pairs).

  python -m lmtrain.train --config configs/mqar.py:attention=gla --workdir runs/mqar-gla

Sequence 64, pairs drawn from 4/8/16 per row, vocabulary 64, width 128 (see the README's MQAR
section for how this differs from Zoology's own runs).
"""
from lmtrain import config as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, attention="softmax")
  c = config_lib.base_config()
  c.model.update(vocab_size=258, num_layers=2, d_model=128, num_heads=2, num_kv_heads=2,
                 mlp_dim=256, dtype="float32")
  c.data.update(source="mqar", seq_len=64, batch_size=64, mqar_num_pairs="4,8,16",
                mqar_vocab_size=64, eval_batches=4)
  c.train.update(steps=1000, lr=3e-3, warmup_steps=50, weight_decay=0.1, log_every=50,
                 eval_every=500, checkpoint_every=500)
  c.eval.update(evals="mqar", mqar_pairs="4,8,16", mqar_samples=128)
  config_lib.apply_attention_variant(c, variant.attention)
  return c
