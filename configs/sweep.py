"""The attention sweep: the tiny model with one attention kind, trained briefly and evaluated
with every eval; scripts/sweep.sh runs all kinds and the comparison (about 7 minutes
per variant on a 2-core CPU).

  python -m lmtrain.train --config configs/sweep.py:attention=moba --workdir runs/sweep/moba
"""
from configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.train.update(steps=200, warmup_steps=20, eval_every=200, checkpoint_every=100,
                 log_every=20)
  c.eval.update(ppl_tokens=16384, niah_samples=2, extrapolation_tokens=8192, mqar_samples=32,
                mqar_pairs="2,4,8", lengths="128,256,512")
  return c
