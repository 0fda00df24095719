"""The benchmark runs end to end at tiny shapes (speed itself is measured on accelerators)."""
import json

import pytest

from pallas_kernels import bench


@pytest.mark.parametrize("family", ["blockwise", "linear", "sparse"])
def test_bench_prints_a_table_and_writes_json(family, tmp_path, capsys):
  out = tmp_path / "b.json"
  assert bench.main(["--family", family, "--lengths", "64,128", "--tokens", "256", "--heads",
                     "2", "--head-dim", "64", "--dtype", "float32", "--iters", "1",
                     "--json", str(out)]) == 0
  data = json.loads(out.read_text())
  assert data["family"] == family and data["rows"]
  for row in data["rows"]:
    assert "error" not in row, row
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["tokens_per_s"] > 0
  assert "| impl |" in capsys.readouterr().out
  if family == "blockwise":  # ours beside the XLA peer, with a ratio per length
    assert [r["length"] for r in data["ratios"]] == [64, 128]


def test_sparse_bench_compares_like_with_like_and_reports_kept_work(tmp_path, capsys):
  """Issue 6's table: MoBA beside full causal (ours; cuDNN's on a GPU), each row with the
  fraction of causal pairs its pattern keeps, and one ratio per named pair."""
  out = tmp_path / "s.json"
  assert bench.main(["--family", "sparse", "--lengths", "2048", "--tokens", "2048", "--heads",
                     "1", "--head-dim", "32", "--dtype", "float32", "--iters", "1",
                     "--json", str(out)]) == 0
  data = json.loads(out.read_text())
  kept = {r["impl"].split(" (")[0]: r["kept_fraction"] for r in data["rows"]}
  assert kept["ours full causal"] == 1.0
  # window 1024 of T=2048: (1024 * 1025 / 2 + 1024 * 1024) / (2048 * 2049 / 2)
  assert abs(kept["ours sliding window 1024"] - 0.7498) < 1e-3
  # MoBA 512/top 4 of 4 blocks keeps every causal pair (3 past blocks exist at most)
  assert abs(kept["ours MoBA 512/top4"] - 1.0) < 1e-6
  assert [(r["ours"].split(" (")[0], r["peer"].split(" (")[0]) for r in data["ratios"]] == [
      ("ours MoBA 512/top4", "ours full causal")]
  assert "| kept |" in capsys.readouterr().out


def test_kept_fraction_of_moba_counts_routed_blocks():
  import jax.numpy as jnp
  from pallas_kernels import MoBA
  t, bs = 1024, 128
  q = jnp.ones((1, t, 2, 8))
  k = jnp.ones((1, t, 2, 8))
  # top 2: own block causally + one full past block for every query past the first block
  want = (8 * (bs * (bs + 1) / 2) + 7 * bs * bs) / (t * (t + 1) / 2)
  assert abs(bench.kept_fraction(MoBA(bs, 2), q, k) - want) < 1e-6
