"""The one-value rules (configs/validation.py: ALLOWS_INF, POSITIVE_INTS, POSITIVE_OR_UNSET),
through every way a value is set: a YAML file, a key=value override and the keyword
constructors (AttentionSettings, RopeSpec); and a key repeated within one YAML file.

No JAX compilation: settings are built, never called.
"""

import dataclasses
import math

import pytest
from flax import nnx

from meshattn.configs import ConfigError, load_config, loader, validation
from meshattn.layers import Attention
from meshattn.layers.rope import RopeSpec
from meshattn.layers.settings import AttentionSettings

N = 8  # device count the mesh checks use
BASE = load_config("base", num_devices=N)
FLOAT_KEYS = sorted(k for k, v in BASE.items() if isinstance(v, float))
KEYWORDS = dict(emb_dim=32, num_query_heads=4, num_kv_heads=2, head_dim=8)


def load(*overrides, name="tiny"):
  return load_config(name, *overrides, num_devices=N)


def float_fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if "float" in str(f.type)]


# --------------------------------------------------------------------------- #
# Non-finite floats
# --------------------------------------------------------------------------- #


def test_float_keys_are_found():
  assert {"attn_logits_soft_cap", "query_pre_attn_scalar", "rope_factor"} <= set(FLOAT_KEYS)
  assert {"attn_logits_soft_cap", "query_pre_attn_scalar", "dropout_rate"} <= set(
    float_fields(AttentionSettings))
  assert {"factor", "beta_fast", "attention_factor"} <= set(float_fields(RopeSpec))


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_non_finite_overrides(key, value):
  # rope_type yarn so that rope_factor is in use, as in the reported case
  with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got -?(nan|inf)$"):
    load("rope_type=yarn", f"{key}={value}")


@pytest.mark.parametrize("key", ["attn_logits_soft_cap", "query_pre_attn_scalar", "rope_factor"])
def test_non_finite_in_a_yaml_file(tmp_path, key):
  path = tmp_path / "bad.yml"
  path.write_text(f"base_config: tiny.yml\nrope_type: yarn\n{key}: .inf\n")
  with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got inf$"):
    load(name=str(path))


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("key", float_fields(AttentionSettings))
def test_every_float_keyword_rejects_non_finite(key, value):
  with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got (nan|inf)$"):
    AttentionSettings(**KEYWORDS, **{key: value})


@pytest.mark.parametrize("key", float_fields(RopeSpec))
def test_every_rope_keyword_rejects_non_finite(key):
  with pytest.raises(ConfigError, match=rf"^RopeSpec\.{key}: must be a finite number, got nan$"):
    RopeSpec("yarn", **{key: math.nan})


def test_attention_keywords_reject_non_finite():
  with pytest.raises(ValueError, match="attn_logits_soft_cap: must be a finite number, got nan"):
    Attention(rngs=nnx.Rngs(0), **KEYWORDS, attn_logits_soft_cap=math.nan)
  with pytest.raises(ValueError, match="RopeSpec.factor: must be a finite number, got inf"):
    Attention(rngs=nnx.Rngs(0), **KEYWORDS, rope=RopeSpec("yarn", factor=math.inf))


def test_a_key_may_be_declared_to_allow_inf(monkeypatch):
  monkeypatch.setattr(validation, "ALLOWS_INF", frozenset({"attn_logits_soft_cap"}))
  assert load("attn_logits_soft_cap=.inf").attn_logits_soft_cap == math.inf
  with pytest.raises(ConfigError, match="attn_logits_soft_cap: must be a finite number, got nan"):
    load("attn_logits_soft_cap=.nan")  # nan never


# --------------------------------------------------------------------------- #
# Sizes >= 1
# --------------------------------------------------------------------------- #

SETTING_FIELDS = {f.name for f in dataclasses.fields(AttentionSettings)}
ROPE_FIELDS = {f.name for f in dataclasses.fields(RopeSpec)}


def test_every_positive_int_names_a_key_or_keyword():
  unknown = set(validation.POSITIVE_INTS) - set(BASE) - SETTING_FIELDS - ROPE_FIELDS
  assert not unknown, f"POSITIVE_INTS names no config key or keyword: {unknown}"


@pytest.mark.parametrize("key", [k for k in validation.POSITIVE_INTS if k in BASE])
def test_positive_int_keys_reject_zero_in_overrides(key):
  with pytest.raises(ConfigError, match=rf"^{key}: must be >= 1, got 0$"):
    load(f"{key}=0")


@pytest.mark.parametrize("key", [k for k in validation.POSITIVE_INTS if k in SETTING_FIELDS])
def test_positive_int_keywords_reject_zero(key):
  with pytest.raises(ConfigError, match=rf"^{key}: must be >= 1, got 0$"):
    AttentionSettings(**{**KEYWORDS, key: 0})


def test_keyword_emb_dim_zero_is_named():
  """Was a ZeroDivisionError (head_dim = emb_dim // heads = 0) or a RoPE error."""
  with pytest.raises(ValueError, match=r"^emb_dim: must be >= 1, got 0$"):
    Attention(rngs=nnx.Rngs(0), emb_dim=0, num_query_heads=4)
  with pytest.raises(ValueError, match=r"^emb_dim: must be an integer >= 1, got 32.0$"):
    Attention(rngs=nnx.Rngs(0), emb_dim=32.0, num_query_heads=4)
  with pytest.raises(ValueError, match=r"^RopeSpec.original_max_position_embeddings: must be >= 1"):
    RopeSpec("yarn", original_max_position_embeddings=0)


# --------------------------------------------------------------------------- #
# > 0 or unset
# --------------------------------------------------------------------------- #

SCALAR_MESSAGE = (r"^query_pre_attn_scalar: must be > 0, or 0 \(None as a keyword\) for softmax "
                  r"scale head_dim\*\*-0.5, got -4(\.0)?$")


def test_negative_query_pre_attn_scalar_rejected_by_every_path(tmp_path):
  """Was a complex softmax scale and a TypeError at call time (keyword path)."""
  with pytest.raises(ConfigError, match=SCALAR_MESSAGE):
    load("query_pre_attn_scalar=-4")
  path = tmp_path / "bad.yml"
  path.write_text("base_config: tiny.yml\nquery_pre_attn_scalar: -4.0\n")
  with pytest.raises(ConfigError, match=SCALAR_MESSAGE):
    load(name=str(path))
  with pytest.raises(ConfigError, match=SCALAR_MESSAGE):
    Attention(rngs=nnx.Rngs(0), **KEYWORDS, query_pre_attn_scalar=-4)


def test_unset_values_mean_the_same_in_every_path():
  head_scale = KEYWORDS["head_dim"] ** -0.5
  for unset in (None, 0, 0.0):
    s = AttentionSettings(**KEYWORDS, query_pre_attn_scalar=unset, attn_logits_soft_cap=unset)
    assert s.scale == head_scale and s.query_pre_attn_scalar is None
    assert s.attn_logits_soft_cap is None  # the kernels' one spelling of "no cap"
  cfg = load("query_pre_attn_scalar=0", "attn_logits_soft_cap=0", "head_dim=8")
  s = AttentionSettings.from_config(cfg)
  assert s.scale == head_scale and s.attn_logits_soft_cap is None
  s = AttentionSettings.from_config(load("query_pre_attn_scalar=4", "attn_logits_soft_cap=30"))
  assert s.scale == 0.5 and s.attn_logits_soft_cap == 30.0
  with pytest.raises(ConfigError, match=r"^attn_logits_soft_cap: must be > 0, or 0 .*no soft cap"):
    AttentionSettings(**KEYWORDS, attn_logits_soft_cap=-1.0)


# --------------------------------------------------------------------------- #
# A key repeated in one YAML file
# --------------------------------------------------------------------------- #


def test_repeated_key_in_a_file_is_rejected(tmp_path):
  path = tmp_path / "twice.yml"
  path.write_text("base_config: tiny.yml\nrope_factor: 4.0\nemb_dim: 64\n\nrope_factor: 2.0\n")
  with pytest.raises(ConfigError, match=rf"^rope_factor: set twice in {path}, on line 2 and "
                     r"line 5; a key may appear once per file$"):
    load(name=str(path))


def test_repeated_key_in_a_nested_mapping_or_an_override_is_rejected(tmp_path):
  path = tmp_path / "nested.yml"
  path.write_text("base_config: tiny.yml\nlogical_axis_rules:\n  - {a: 1, a: 2}\n")
  with pytest.raises(ConfigError, match=rf"^a: set twice in {path}, on line 3 and line 3"):
    load(name=str(path))
  with pytest.raises(ConfigError, match=r"^override logical_axis_rules: 'a' is set twice"):
    load("logical_axis_rules={a: 1, a: 2}")


def test_a_key_may_still_override_its_parent_and_a_merge_key(tmp_path):
  (tmp_path / "parent.yml").write_text("base_config: tiny.yml\nrope_factor: 4.0\n")
  child = tmp_path / "child.yml"
  child.write_text("base_config: parent.yml\nrope_factor: 2.0\n")
  assert load(name=str(child)).rope_factor == 2.0
  # An explicit key beside `<<: *anchor` overrides the merged one; it is not a repeat.
  text = "a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  p: 3\n"
  assert loader._load_yaml(text) == {"a": {"p": 1, "q": 2}, "b": {"p": 3, "q": 2}}
