"""scripts/tune_flash_pallas_gpu.py keeps working: --cpu-smoke runs the Pallas GPU flash
kernel's code path in interpret mode over tiny shapes, each configuration checked against
the reference before it is timed."""

import json

from meshattn.scripts import tune_flash_pallas_gpu as tune


def test_tune_flash_pallas_gpu_cpu_smoke(tmp_path, capsys):
  assert tune.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "best causal" in out and "kwargs:" in out
  result = json.loads((tmp_path / "tune_flash_pallas_gpu.json").read_text())
  rows = result["rows"]
  cases = {(r["case"], r["mode"]) for r in rows}
  assert {(c, m) for c in ("causal", "soft cap 50", "segments x4 + sinks")
          for m in ("fwd", "fwd+bwd")} <= cases
  timed = [r for r in rows if r["mode"] in ("fwd", "fwd+bwd")]
  assert all(r["status"] == "ok" and r["ms"] > 0 and r["max_err"] < 2e-2 for r in timed), timed
  for case in ("causal", "soft cap 50", "segments x4 + sinks"):
    assert set(result["best"][case]) == {"fwd", "fwd+bwd", "kwargs"}
