"""Zoology's MQAR at CPU scale: a 2-layer model trained on multi-query associative recall, the
setting of `python -m lmtrain.mqar_check` (every attention kind, recall by number of pairs).

  python -m lmtrain.train --config configs/mqar.py:attention=gla --workdir runs/mqar-gla

Sequence 32, pairs drawn from 2/4/8 per row, MQAR vocabulary 256, width 128 (2 heads of 64),
batch 64, 800 steps (see the README's MQAR section for how this differs from Zoology's own
runs; mqar_check's state check narrows the heads to 16 of 8).
"""
from lmtrain import config as config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, attention="softmax")
  c = config_lib.base_config()
  c.model.update(vocab_size=258, num_layers=2, d_model=128, num_heads=2, num_kv_heads=2,
                 mlp_dim=64, dtype="float32")
  c.data.update(source="mqar", seq_len=32, batch_size=64, mqar_num_pairs="2,4,8",
                mqar_vocab_size=256, eval_batches=4)
  c.train.update(steps=800, lr=3e-3, warmup_steps=50, weight_decay=0.1, log_every=50,
                 eval_every=400, checkpoint_every=400)
  c.eval.update(evals="mqar", mqar_pairs="2,4,8", mqar_samples=256)
  config_lib.apply_attention_variant(c, variant.attention)
  from lmtrain.model import mixers
  for kind in set(config_lib.layer_pattern_kinds(c.model.attention)):
    # two chunks of 16 per row: the fastest chunked form on this CPU (64 would pad each row)
    if "chunk_size" in mixers.get(kind).Options.config_fields():
      c.model.attention[kind].chunk_size = 16
  return c
