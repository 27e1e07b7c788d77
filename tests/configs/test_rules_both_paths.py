"""Each rule the config and the keyword constructor share, through both paths.

A case is refused as a config (YAML / key=value override: a ConfigError naming the key)
and as keywords (AttentionSettings / RopeSpec: a ValueError naming the argument), so a
rule written once in configs/vocabulary.py cannot be skipped by one of them. Fast: no
JAX work beyond building settings.
"""

import jax.numpy as jnp
import pytest

from meshattn.configs import ConfigError, load_config
from meshattn.layers import RopeSpec
from meshattn.layers.settings import AttentionSettings

SMALL = dict(emb_dim=64, num_query_heads=4, head_dim=16)


def load(*overrides, name="tiny"):
  return load_config(name, *overrides, num_devices=8)


def keywords(**kwargs):
  return AttentionSettings(**{**SMALL, **kwargs})


# name: (config overrides, config message, keyword builder, keyword message)
CASES = {
    "yarn_beta_slow_zero": (
        ["rope_type=yarn", "beta_slow=0"], r"^beta_slow: must be > 0",
        lambda: RopeSpec("yarn", beta_slow=0.0), r"beta_slow=0.0: must be > 0"),
    "yarn_beta_slow_negative": (
        ["rope_type=yarn", "beta_slow=-1"], r"^beta_slow: must be > 0",
        lambda: RopeSpec("yarn", beta_slow=-1.0), r"beta_slow=-1.0: must be > 0"),
    "yarn_beta_fast_negative": (
        ["rope_type=yarn", "beta_fast=-1", "beta_slow=-2"], r"^beta_slow: must be > 0",
        lambda: RopeSpec("yarn", beta_fast=-1.0, beta_slow=-2.0), r"beta_slow=-2.0: must be > 0"),
    "yarn_betas_swapped": (
        ["rope_type=yarn", "beta_fast=1.0", "beta_slow=32.0"], r"^beta_fast: must be > beta_slow",
        lambda: RopeSpec("yarn", beta_fast=1.0, beta_slow=32.0),
        r"beta_fast=1.0: must be > beta_slow=32.0"),
    "rope_min_timescale": (
        ["rope_min_timescale=0"], r"^rope_min_timescale: must be > 0",
        lambda: RopeSpec(min_timescale=0.0), r"min_timescale=0.0: must be > 0"),
    "rope_max_below_min": (
        ["rope_max_timescale=1"], r"^rope_max_timescale: must be > rope_min_timescale",
        lambda: RopeSpec(max_timescale=1.0), r"max_timescale=1.0: must be > min_timescale"),
    "rope_factor": (
        ["rope_type=llama3.1", "rope_factor=0.5"], r"^rope_factor: must be >= 1",
        lambda: RopeSpec("llama3.1", factor=0.5), r"factor=0.5: must be >= 1"),
    "rope_low_freq_factor": (
        ["rope_type=llama3.1", "rope_low_freq_factor=0"], r"^rope_low_freq_factor: must be > 0",
        lambda: RopeSpec("llama3.1", low_freq_factor=0.0), r"low_freq_factor=0.0: must be > 0"),
    "rope_high_below_low": (
        ["rope_type=llama3.1", "rope_high_freq_factor=0.5"],
        r"^rope_high_freq_factor: must be >= rope_low_freq_factor",
        lambda: RopeSpec("llama3.1", high_freq_factor=0.5),
        r"high_freq_factor=0.5: must be >= low_freq_factor"),
    "rope_attention_factor": (
        ["rope_attention_factor=-1"], r"^rope_attention_factor: must be >= 0",
        lambda: RopeSpec(attention_factor=-1.0), r"attention_factor=-1.0: must be >= 0"),
    "norm_epsilon": (
        ["use_qk_norm=true", "normalization_layer_epsilon=-1.0"],
        r"^normalization_layer_epsilon: must be > 0",
        lambda: keywords(use_qk_norm=True, normalization_layer_epsilon=-1.0),
        r"normalization_layer_epsilon=-1.0: must be > 0"),
    "tuning_floor_scale": (
        ["temperature_tuning_floor_scale=0"], r"^temperature_tuning_floor_scale: must be > 0",
        lambda: keywords(temperature_tuning_floor_scale=0.0),
        r"temperature_tuning_floor_scale=0.0: must be > 0"),
    "prefill_longer_than_target": (
        ["max_prefill_predict_length=100", "max_target_length=10"],
        r"^max_prefill_predict_length: must be in \[1, max_target_length=10\]",
        lambda: keywords(max_target_length=10, max_prefill_predict_length=100),
        r"max_prefill_predict_length=100: must be in \[1, max_target_length=10\]"),
    "axis_order_str": (
        ["prefill_cache_axis_order=[0, 1, 2, '3']"], r"^prefill_cache_axis_order: must be a perm",
        lambda: keywords(prefill_cache_axis_order=(0, 1, 2, "3")),
        r"prefill_cache_axis_order=.*permutation"),
    "axis_order_float": (
        ["ar_cache_axis_order=[0.0, 1, 2, 3]"], r"^ar_cache_axis_order: must be a perm",
        lambda: keywords(ar_cache_axis_order=(0.0, 1, 2, 3)), r"ar_cache_axis_order=.*permutation"),
    "axis_order_bool": (
        ["ar_cache_axis_order=[true, 0, 2, 3]"], r"^ar_cache_axis_order: must be a perm",
        lambda: keywords(ar_cache_axis_order=(True, 0, 2, 3)), r"ar_cache_axis_order=.*permutation"),
    "logical_rule_shape": (
        ["logical_axis_rules=[[embed]]"], r"^logical_axis_rules: rule .* must be \[logical_name",
        lambda: keywords(logical_axis_rules=(("embed",),)),
        r"logical_axis_rules: rule .* must be \[logical_name"),
    "logical_rule_target": (
        ["logical_axis_rules=[[embed, 3]]"], r"^logical_axis_rules: rule .* axes must be a str",
        lambda: keywords(logical_axis_rules=(("embed", 3),)),
        r"logical_axis_rules: rule .* axes must be a str"),
    "dtype_name": (
        ["dtype=bf16"], r"^dtype: 'bf16' is not one of",
        lambda: keywords(dtype="bf16"), r"dtype='bf16': allowed .*'bfloat16'"),
    "weight_dtype_name": (
        ["weight_dtype=float33"], r"^weight_dtype: 'float33' is not one of",
        lambda: keywords(weight_dtype="float33"), r"weight_dtype='float33': allowed .*'float32'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_by_config(name):
  overrides, message, _, _ = CASES[name]
  with pytest.raises(ConfigError, match=message):
    load(*overrides)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_by_keywords(name):
  _, _, build, message = CASES[name]
  with pytest.raises(ValueError, match=message):
    build()


def test_valid_cases_pass_both_paths():
  # The edges of each rule are allowed: equal llama3.1 factors, a one-token prefill.
  load("rope_type=llama3.1", "rope_low_freq_factor=1.0", "rope_high_freq_factor=1.0")
  RopeSpec("llama3.1", low_freq_factor=1.0, high_freq_factor=1.0)
  load("max_prefill_predict_length=32", "max_target_length=32")
  keywords(max_target_length=32, max_prefill_predict_length=32)
  load("rope_type=yarn", "beta_fast=2.0", "beta_slow=0.5")
  RopeSpec("yarn", beta_fast=2.0, beta_slow=0.5)


def test_dtype_keyword_takes_names_and_objects():
  # A name reads as the jnp dtype, so keywords and a config give equal records.
  assert keywords(dtype="bfloat16", weight_dtype="float16").dtype == jnp.bfloat16
  assert keywords(dtype="bfloat16") == keywords(dtype=jnp.bfloat16)
  assert keywords(dtype=jnp.float32).weight_dtype == jnp.float32


@pytest.mark.parametrize("override", [{1: 2}, {None: 2}])
def test_non_string_key_in_override(override):
  with pytest.raises(ConfigError, match=r"config keys are strings"):
    load(override)


def test_non_string_key_in_yaml(tmp_path):
  path = tmp_path / "intkey.yml"
  path.write_text("base_config: tiny.yml\n1: 2\n")
  with pytest.raises(ConfigError, match=r"^1: config keys are strings"):
    load_config(path, num_devices=8)


@pytest.mark.parametrize("theta", ["500000.0", "5e5", "500000"])
def test_float_rope_theta(theta):
  # HF's rope_theta is a float; an int still reads as one.
  assert load(f"rope_max_timescale={theta}").rope_max_timescale == 500000.0
