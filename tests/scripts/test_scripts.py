"""The layer check, the demo's command lines and the cache-memory script keep working (thin
CLIs over the library; `make check-layer` runs the first, `make demo` the second, whose stages
tests/training and tests/serving run end to end)."""

import importlib.util
import pathlib

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


def load(name):
  spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_layer_check_passes_its_own_checks(capsys):
  assert load("check_layer").main(["num_kv_heads=1", "attention_sink=true"]) == 0
  out = capsys.readouterr().out
  for heading in ("parameters", "activations (train mode)", "train step fwd+bwd", "serving"):
    assert heading in out
  assert "OK:" in out


def test_demo_trains_on_two_processes_then_serves_the_checkpoint_on_another_mesh():
  demo = load("demo")
  train, serve, checkpoints = demo.commands(demo.parse_args(
      ["tiny-lm", "learning_rate=2e-3", "--out", "/tmp/x"]))
  assert train[train.index("-n") + 1] == "2" and "--cpu-devices" in train
  at = train.index("--")
  assert train[at + 1].endswith("train.py") and train[at + 2] == "tiny-lm"
  assert "learning_rate=2e-3" in train and f"checkpoint_dir={checkpoints}" in train
  assert serve[1].endswith("serve.py") and serve[2] == str(checkpoints)
  assert "ici_tensor_parallelism=2" in serve
  assert demo.parse_args(["steps=5"]).config == "tiny-lm"  # the preset is optional


def test_cache_memory_table(capsys):
  assert load("cache_memory").main(["mistral-7b"]) == 0
  out = capsys.readouterr().out
  assert "ring (window 4096)" in out and "int4 per token+head" in out
  # bf16 K+V for 8 kv heads x 128 dims: 2 * 8 * 128 * 2 bytes per token.
  assert "4096.0" in out
