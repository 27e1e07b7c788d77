"""scripts/bench_engine.py (the mixed-step cost table the GPU run reports) keeps working:
tiny CPU sizes, the same code path. (`--trace` runs the Engine, whose loop
tests/serving/test_engine.py and test_serve.py check; left out here for the suite's time.)"""

import json
import math

from meshattn.scripts import bench_engine


def test_bench_engine_cpu_smoke(tmp_path, capsys):
  out_json = tmp_path / "engine.json"
  args = ["tiny-lm", "num_decoder_layers=1", "--slots", "3", "--chunk", "4", "--context", "4",
          "--iters", "1", "--json", str(out_json)]
  assert bench_engine.main(args) == 0
  out = capsys.readouterr().out
  for row in ("decode  2 rows x 1", "chunk   1 row x 4", "mixed   2 rows x 1 + 1 x 4",
              "mixed / (decode + chunk)"):
    assert row in out, out
  result = json.loads(out_json.read_text())
  assert set(result["ms"]) == {"decode", "chunk", "mixed"}
  assert all(ms > 0 for ms in result["ms"].values())
  want = result["ms"]["mixed"] / (result["ms"]["decode"] + result["ms"]["chunk"])
  assert math.isclose(result["ratio"], want)
