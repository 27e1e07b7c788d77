"""scripts/bench_step_overhead.py runs and prints its four rows (a smoke test: timings are
the script's business, not the suite's)."""

import pytest

from meshattn.scripts import bench_step_overhead


def test_step_overhead_table(capsys):
  rows = bench_step_overhead.main(["--batch", "2", "--capacity", "32", "--calls", "2"])
  assert [what for what, _ in rows] == ["jit_step (check=True)", "jit_step, check=False",
                                        "nnx.jit (donated)", "bare jax.jit (a + 1)"]
  assert all(us > 0 for _, us in rows)
  assert "us per call" in capsys.readouterr().out


def test_too_small_a_cache_is_refused_before_timing():
  with pytest.raises(SystemExit, match="--capacity 8 < the 25 tokens"):
    bench_step_overhead.main(["--capacity", "8", "--calls", "2"])
