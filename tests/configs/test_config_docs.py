"""Every key of configs/base.yml is documented in docs/configuration.md: by name
(`key`), or, for the per-axis mesh degrees and the per-mode axis names, by the
pattern the page writes them as (`ici_<axis>_parallelism`, `prefill_` / `decode_`
variants of a documented `*_axis_names` key)."""

from __future__ import annotations

import pathlib
import re

import yaml

from meshattn.configs import loader

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def undocumented(keys, text: str) -> list[str]:
  named = set(re.findall(r"`([a-z0-9_.]+)`", text))
  missing = []
  for key in keys:
    mesh = re.fullmatch(r"(ici|dcn)_(\w+)_parallelism", key)
    mode = re.fullmatch(r"(prefill|decode)_(\w+_axis_names)", key)
    if key in named:
      continue
    if mesh and f"{mesh.group(1)}_<axis>_parallelism" in text:
      continue
    if mode and mode.group(2) in named and "`prefill_` / `decode_` variants" in text:
      continue
    missing.append(key)
  return missing


def test_every_base_key_is_documented():
  keys = list(yaml.safe_load(loader.BASE_CONFIG_PATH.read_text()))
  assert keys, "base.yml has no keys"
  missing = undocumented(keys, DOC.read_text())
  assert not missing, f"keys of configs/base.yml missing from docs/configuration.md: {missing}"


def test_a_missing_key_is_named():
  text = "`emb_dim` and `ici_<axis>_parallelism`; `query_axis_names` with `prefill_` / `decode_` variants"
  keys = ["emb_dim", "ici_data_parallelism", "prefill_query_axis_names", "head_dim",
          "decode_key_axis_names"]
  assert undocumented(keys, text) == ["head_dim", "decode_key_axis_names"]
