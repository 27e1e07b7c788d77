"""scripts/bench_engine.py (the mixed-step cost table the GPU run reports) keeps working:
tiny CPU sizes, the same code paths (the step table and the engine loop)."""

import json
import math

from meshattn.scripts import bench_engine


def test_bench_engine_cpu_smoke(tmp_path, capsys):
  out_json = tmp_path / "engine.json"
  args = ["tiny-lm", "num_decoder_layers=1", "--slots", "3", "--chunk", "4", "--context", "4",
          "--iters", "1", "--trace", "3", "--new-tokens", "2", "--json", str(out_json)]
  assert bench_engine.main(args) == 0
  out = capsys.readouterr().out
  for row in ("decode  2 rows x 1", "chunk   1 row x 4", "mixed   2 rows x 1 + 1 x 4",
              "mixed / (decode + chunk)", "engine loop: 3 requests of 4 prompt + 2 output"):
    assert row in out, out
  result = json.loads(out_json.read_text())
  assert set(result["ms"]) == {"decode", "chunk", "mixed"}
  assert all(ms > 0 for ms in result["ms"].values())
  want = result["ms"]["mixed"] / (result["ms"]["decode"] + result["ms"]["chunk"])
  assert math.isclose(result["ratio"], want)
  trace = result["trace"]
  assert trace["requests"] == 3 and trace["output_tokens"] == 6 and trace["tokens_per_s"] > 0
