"""scripts/tune_decode.py keeps working: --cpu-smoke runs every kernel's GPU code
path in interpret mode over tiny shapes, checked against the reference first."""

import importlib.util
import json
import pathlib
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "tune_decode.py"


def test_tune_decode_cpu_smoke(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("tune_decode", SCRIPT)
  tune = importlib.util.module_from_spec(spec)
  sys.modules["tune_decode"] = tune  # dataclasses look their module up there
  spec.loader.exec_module(tune)
  assert tune.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "device copy" in out and "best ragged int8" in out
  result = json.loads((tmp_path / "tune_decode.json").read_text())
  rows = result["rows"]
  assert {r["kernel"] for r in rows} == {"ragged", "paged", "ragged int8"}
  assert all(r["status"] == "ok" and r["ms"] > 0 and r["max_err"] < 2e-2 for r in rows), rows
  assert all(r["speedup"] for r in rows if r["kernel"] == "ragged int8")
  assert set(result["best"]) == {"ragged", "paged", "ragged int8"}
