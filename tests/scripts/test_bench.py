"""scripts/bench.py keeps working: tiny CPU sizes, every kernel checked against
the reference before it is timed (the GPU run uses the same code paths)."""

import importlib.util
import json
import pathlib
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def test_bench_cpu_smoke(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("bench", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  sys.modules["bench"] = bench  # dataclasses look their module up there
  spec.loader.exec_module(bench)
  sections = ["prefill", "features", "long", "decode", "layer"]
  assert bench.main(["--cpu-smoke", "--check", "--out", str(tmp_path), "--sections", *sections]) == 0
  out = capsys.readouterr().out
  for section in ("prefill fwd", "prefill fwd+bwd", "soft cap fwd", "segments x4 + sinks fwd+bwd",
                  "decode", "layer fwd+bwd"):
    assert section in out
  rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
  kernels = {r["kernel"] for r in rows}
  assert {"dot_product", "blockwise", "jax.nn xla", "ragged (reference)", "paged (reference)",
          "meshattn Attention"} <= kernels
  assert all(r["status"].startswith("ok") for r in rows), [r for r in rows if r["status"] != "ok"]
