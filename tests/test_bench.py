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
