"""scripts/bench.py keeps working: tiny CPU sizes, every kernel checked against
the reference before it is timed (the GPU run uses the same code paths)."""

import json

from meshattn.scripts import bench


def test_bench_cpu_smoke(tmp_path, capsys):
  sections = ["prefill", "features", "long", "decode", "layer", "linear"]
  assert bench.main(["--cpu-smoke", "--check", "--out", str(tmp_path), "--sections", *sections]) == 0
  out = capsys.readouterr().out
  for section in ("prefill fwd", "prefill fwd+bwd", "soft cap fwd", "segments x4 + sinks fwd+bwd",
                  "decode", "layer fwd+bwd", "linear fwd+bwd", "linear decode"):
    assert section in out
  rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
  kernels = {r["kernel"] for r in rows}
  assert {"dot_product", "blockwise", "jax.nn xla", "ragged (reference)", "paged (reference)",
          "meshattn Attention", "linear (chunk 40)", "linear step (state)"} <= kernels
  assert all(r["status"].startswith("ok") for r in rows), [r for r in rows if r["status"] != "ok"]


def test_steps_section_cpu_smoke(tmp_path, capsys):
  """The layer's serving steps against their parts (scripts/bench_layer.py through bench.py):
  every row timed, each ratio named by what it is against."""
  assert bench.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "steps",
                     "--steps-caches", "paged"]) == 0
  rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
  kernels = {r["kernel"] for r in rows}
  assert {"paged: jit_step", "paged: jit_step, check=False", "paged: lax.scan x16",
          "paged: parts: kernel+proj+write", "contiguous: fresh prefill (+1 reset, 2 slots)",
          "contiguous: train forward", "contiguous: chunk step"} <= kernels
  assert all(r["ms"] and r["ms"] > 0 for r in rows)
  assert all(r["status"].endswith(("x parts", "x train forward")) for r in rows if r["status"])
