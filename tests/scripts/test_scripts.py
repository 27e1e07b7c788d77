"""The demo and the cache-memory script keep working (they are thin CLIs over
the library; `make demo` runs the first)."""

import importlib.util
import pathlib

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


def load(name):
  spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_demo_passes_its_own_checks(capsys):
  assert load("demo").main(["num_kv_heads=1", "attention_sink=true"]) == 0
  out = capsys.readouterr().out
  for heading in ("parameters", "activations (train mode)", "train step fwd+bwd", "serving"):
    assert heading in out
  assert "OK:" in out


def test_cache_memory_table(capsys):
  assert load("cache_memory").main(["mistral-7b"]) == 0
  out = capsys.readouterr().out
  assert "ring (window 4096)" in out and "int4 per token+head" in out
  # bf16 K+V for 8 kv heads x 128 dims: 2 * 8 * 128 * 2 bytes per token.
  assert "4096.0" in out
