"""scripts/tune_decode.py keeps working: --cpu-smoke runs every kernel's GPU code
path in interpret mode over tiny shapes, checked against the reference first."""

import json

from meshattn.scripts import tune_decode as tune


def test_tune_decode_cpu_smoke(tmp_path, capsys):
  assert tune.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "device copy" in out and "best ragged int8" in out
  result = json.loads((tmp_path / "tune_decode.json").read_text())
  rows = result["rows"]
  assert {r["kernel"] for r in rows} == {"ragged", "paged", "ragged int8"}
  assert all(r["status"] == "ok" and r["ms"] > 0 and r["max_err"] < 2e-2 for r in rows), rows
  assert all(r["speedup"] for r in rows if r["kernel"] == "ragged int8")
  assert set(result["best"]) == {"ragged", "paged", "ragged int8"}
