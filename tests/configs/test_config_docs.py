"""Every key of configs/base.yml is documented in docs/configuration.md: by name
(`key`), or, for the per-axis mesh degrees and the per-mode axis names, by the
pattern the page writes them as (`ici_<axis>_parallelism`, `prefill_` / `decode_`
variants of a documented `*_axis_names` key)."""

from __future__ import annotations

import pathlib
import re

import yaml

from meshattn.configs import key_table, loader

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


def test_key_table_is_generated_from_base_yml():
  """docs/configuration.md's table of every key is key_table's output (regenerate with
  `python -m meshattn.configs.key_table --write`); each base.yml key has one row with its
  default and its comment."""
  text = DOC.read_text()
  want = key_table.table()
  got = text[text.index(key_table.BEGIN):text.index(key_table.END) + len(key_table.END)]
  assert got == want, "docs/configuration.md's key table is stale: run the command above"
  base = loader.BASE_CONFIG_PATH.read_text()
  keys = [k for _, section in key_table.rows(base) for k, _, _ in section]
  assert keys == list(yaml.safe_load(base))  # every key, once, in order
  described = {k: (d, c) for _, section in key_table.rows(base) for k, d, c in section}
  assert described["emb_dim"] == ("2048", "D: width of the layer's inputs and outputs")
  assert described["decode_query_axis_names"][1] == "`query_axis_names` for decode mode"
  assert described["logical_axis_rules"][1].startswith("Logical axis name -> mesh axis")
  assert all(c for _, c in described.values()), [k for k, (_, c) in described.items() if not c]


def test_key_table_reads_comments_and_quotes():
  rows = key_table.rows("# ---- a part ----\nname: \"x # y\"  # the note\n# about z\nz:\n  - 1\n")
  assert rows == [("a part", [("name", '"x # y"', "the note"),
                              ("z", "a list (base.yml)", "about z")])]
