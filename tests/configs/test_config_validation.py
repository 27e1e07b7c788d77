"""Tests of config validation: every rule is triggered and its message names the
key, and the mesh keys (ici_/dcn_ parallelism per mesh axis) on 8 devices.

Pure Python (no JAX compilation). All loads pass num_devices=8 explicitly
unless the test is about the default.
"""

import pytest

from meshattn.configs import ConfigError, load_config

N = 8  # device count the mesh checks use


def load(*overrides, name="tiny"):
  return load_config(name, *overrides, num_devices=N)


# --------------------------------------------------------------------------- #
# Validation rules: each one triggered, each message names the key
# --------------------------------------------------------------------------- #

# (overrides applied to the tiny preset, regex the ConfigError message must match)
INVALID = {
  "query_heads_zero": (["num_query_heads=0"], r"num_query_heads: must be >= 1"),
  "kv_heads_zero": (["num_kv_heads=0"], r"num_kv_heads: must be >= 1"),
  "kv_heads_not_divisor": (["num_kv_heads=3"], r"num_kv_heads: 3 must divide num_query_heads=4"),
  "head_dim_zero": (["head_dim=0", "rope_type=none"], r"head_dim: must be >= 1"),
  "head_dim_odd_with_rope": (["head_dim=15"], r"head_dim: must be even when rope_type='default'"),
  "rotary_factor_zero": (
    ["partial_rotary_factor=0.0"],
    r"partial_rotary_factor: must be in \(0, 1\]",
  ),
  "rotary_factor_above_one": (
    ["partial_rotary_factor=1.5"],
    r"partial_rotary_factor: must be in \(0, 1\]",
  ),
  "rotary_dims_odd": (
    ["partial_rotary_factor=0.0625"],
    r"partial_rotary_factor: rotary dims .* = 1 must be even",
  ),
  "rotary_dims_zero": (
    ["partial_rotary_factor=0.05"],
    r"partial_rotary_factor: rotary dims .* = 0 must be even and > 0",
  ),
  "emb_dim_zero": (["emb_dim=0"], r"emb_dim: must be >= 1"),
  "dtype": (
    ["dtype=float64"],
    r"dtype: 'float64' is not one of \['float32', 'bfloat16', 'float16'\]",
  ),
  "weight_dtype": (["weight_dtype=int8"], r"weight_dtype: 'int8' is not one of \['float32'"),
  "matmul_precision": (
    ["matmul_precision=fast"],
    r"matmul_precision: 'fast' is not one of \['default', 'high', 'highest'\]",
  ),
  "attention_kernel": (
    ["attention=splash"],
    r"attention: 'splash' is not one of \['dot_product', 'blockwise', 'flash', 'ring', 'autoselected'\]",
  ),
  "decode_attention_kernel": (
    ["decode_attention=flash"],
    r"decode_attention: 'flash' is not one of \['dot_product', 'ragged', 'paged', 'autoselected'\]",
  ),
  "kv_quant_axis": (
    ["kv_quant_axis=heads"],
    r"kv_quant_axis: 'heads' is not one of \['dkv', 'heads_and_dkv'\]",
  ),
  "prefill_cache_axis_order": (
    ["prefill_cache_axis_order=[0, 1, 2]"],
    r"prefill_cache_axis_order: must be a permutation of \[0, 1, 2, 3\]",
  ),
  "ar_cache_axis_order": (
    ["ar_cache_axis_order=[0, 1, 1, 3]"],
    r"ar_cache_axis_order: must be a permutation of \[0, 1, 2, 3\]",
  ),
  "prefill_chunk_size": (
    ["use_chunked_prefill=true", "prefill_chunk_size=0"],
    r"prefill_chunk_size: must be >= 1",
  ),
  "num_pages": (["paged_kv_cache=true", "num_pages=0"], r"num_pages: must be >= 1"),
  "tokens_per_page": (
    ["paged_kv_cache=true", "tokens_per_page=0"],
    r"tokens_per_page: must be >= 1",
  ),
  "attention_type": (
    ["attention_type=causal"],
    r"attention_type: 'causal' is not one of \['global', 'local_sliding', 'chunk', 'full', 'linear'\]",
  ),
  "pattern_entry": (
    ["attention_layer_pattern=[global, sliding]"],
    r"attention_layer_pattern: entry 1 'sliding' is not one of",
  ),
  "sliding_window_needed": (
    ["attention_type=local_sliding"],
    r"sliding_window_size: must be > 0 when .*'local_sliding'",
  ),
  "sliding_window_needed_by_pattern": (
    ["attention_layer_pattern=[global, local_sliding]"],
    r"sliding_window_size: must be > 0",
  ),
  "sliding_window_negative": (["sliding_window_size=-1"], r"sliding_window_size: must be >= 0"),
  "chunk_window_needed": (
    ["attention_type=chunk"],
    r"chunk_attn_window_size: must be > 0 when .*'chunk'",
  ),
  "chunk_window_needed_by_pattern": (
    ["attention_layer_pattern=[chunk, global]"],
    r"chunk_attn_window_size: must be > 0",
  ),
  "chunk_window_negative": (["chunk_attn_window_size=-4"], r"chunk_attn_window_size: must be >= 0"),
  "soft_cap_negative": (
    ["attn_logits_soft_cap=-1.0"],
    r"attn_logits_soft_cap: must be > 0, or 0 \(None as a keyword\) for no soft cap, got -1.0",
  ),
  "query_scalar_negative": (
    ["query_pre_attn_scalar=-1"],
    r"query_pre_attn_scalar: must be > 0, or 0 .* for softmax scale head_dim\*\*-0.5",
  ),
  "dropout_one": (["dropout_rate=1.0"], r"dropout_rate: must be in \[0, 1\)"),
  "dropout_negative": (["dropout_rate=-0.1"], r"dropout_rate: must be in \[0, 1\)"),
  "rope_type": (
    ["rope_type=alibi"],
    r"rope_type: 'alibi' is not one of \['default', 'llama3.1', 'yarn', 'none'\]",
  ),
  "rope_min_timescale": (["rope_min_timescale=0"], r"rope_min_timescale: must be > 0"),
  "rope_max_timescale": (
    ["rope_max_timescale=1"],
    r"rope_max_timescale: must be > rope_min_timescale=1",
  ),
  "rope_factor_llama": (["rope_type=llama3.1", "rope_factor=0.5"], r"rope_factor: must be >= 1"),
  "rope_factor_yarn": (["rope_type=yarn", "rope_factor=0.5"], r"rope_factor: must be >= 1"),
  "llama_freq_factors": (
    ["rope_type=llama3.1", "rope_high_freq_factor=0.5"],
    r"rope_high_freq_factor: must be >= rope_low_freq_factor=1.0",
  ),
  "llama_low_freq_zero": (
    ["rope_type=llama3.1", "rope_low_freq_factor=0"],
    r"rope_low_freq_factor: must be > 0",
  ),
  "original_length": (
    ["rope_type=yarn", "original_max_position_embeddings=0"],
    r"original_max_position_embeddings: must be >= 1",
  ),
  "yarn_betas": (["rope_type=yarn", "beta_fast=1"], r"beta_fast: must be > beta_slow=1.0"),
  "rope_attention_factor": (["rope_attention_factor=-1"], r"rope_attention_factor: must be >= 0"),
  "norm_epsilon": (["normalization_layer_epsilon=0"], r"normalization_layer_epsilon: must be > 0"),
  "fused_and_shared": (
    ["fused_qkv=true", "share_kv_projections=true"],
    r"fused_qkv: .*share_kv_projections cannot both",
  ),
  "kv_quant_dtype": (
    ["kv_quant_dtype=fp8"],
    r"kv_quant_dtype: 'fp8' is not one of \['int8', 'int4'\]",
  ),
  "max_target_length": (["max_target_length=0"], r"max_target_length: must be >= 1"),
  "prefill_zero": (["max_prefill_predict_length=0"], r"max_prefill_predict_length: must be >= 1"),
  "prefill_too_long": (
    ["max_prefill_predict_length=65"],
    r"max_prefill_predict_length: must be in \[1, max_target_length=64\]",
  ),
  "mesh_axes_empty": (["mesh_axes=[]"], r"mesh_axes: must name at least one"),
  "mesh_axes_duplicate": (
    ["mesh_axes=[data, fsdp, data]"],
    r"mesh_axes: axis names must be unique, repeated: \['data'\]",
  ),
  "mesh_axes_not_str": (["mesh_axes=[data, 1]"], r"mesh_axes: every entry must be a str"),
  "ici_zero": (
    ["ici_tensor_parallelism=0"],
    r"ici_tensor_parallelism: must be -1 \(fill\) or >= 1",
  ),
  "dcn_negative": (
    ["dcn_data_parallelism=-2"],
    r"dcn_data_parallelism: must be -1 \(fill\) or >= 1",
  ),
  "two_ici_fills": (
    ["ici_data_parallelism=-1"],
    r"ici_fsdp_parallelism: at most one ici_\*_parallelism may be -1",
  ),
  "two_dcn_fills": (
    ["dcn_data_parallelism=-1", "dcn_tensor_parallelism=-1"],
    r"dcn_tensor_parallelism: at most one dcn_\*_parallelism may be -1",
  ),
  "fill_not_divisible": (
    ["ici_data_parallelism=3"],
    r"ici_fsdp_parallelism: -1 fill impossible: device count 8 is not divisible .*ici_data_parallelism=3",
  ),
  "product_mismatch": (
    ["ici_tensor_parallelism=2", "ici_fsdp_parallelism=2"],
    r"ici_fsdp_parallelism: product of ici_\*/dcn_\* parallelism \(ici_fsdp_parallelism=2 \* ici_tensor_parallelism=2\) = 4 must equal the device count 8",
  ),
  "product_mismatch_dcn": (
    ["ici_fsdp_parallelism=4", "dcn_data_parallelism=4"],
    r"product .* = 16 must equal the device count 8",
  ),
  "ici_unknown_axis": (
    ["ici_expert_parallelism=2"],
    r"ici_expert_parallelism: axis 'expert' is not in mesh_axes \['data', 'fsdp', 'context', 'tensor', 'autoregressive'\]",
  ),
  "dcn_unknown_axis": (
    ["dcn_expert_parallelism=1"],
    r"dcn_expert_parallelism: axis 'expert' is not in mesh_axes",
  ),
  "rule_unknown_axis": (
    ["logical_axis_rules=[[embed, [fsdp, expert]]]"],
    r"logical_axis_rules: rule \['embed', \['fsdp', 'expert'\]\] names mesh axis 'expert' not in mesh_axes \['data'",
  ),
  "rule_too_short": (
    ["logical_axis_rules=[[embed]]"],
    r"logical_axis_rules: rule .* must be \[logical_name",
  ),
  "rule_name_not_str": (
    ["logical_axis_rules=[[1, data]]"],
    r"logical_axis_rules: rule .* must be \[logical_name",
  ),
  "rule_axes_not_str": (
    ["logical_axis_rules=[[embed, [data, 1]]]"],
    r"logical_axis_rules: rule .* axes must be a str, a list of str or null",
  ),
  "rule_axes_dict": (
    ["logical_axis_rules=[[embed, {a: 1}]]"],
    r"logical_axis_rules: rule .* axes must be",
  ),
  "input_axis_names_length": (
    ["input_axis_names=[a, b]"],
    r"input_axis_names: must be a list of 3 str",
  ),
  "decode_input_axis_names_length": (
    ["decode_input_axis_names=[a, b, c, d]"],
    r"decode_input_axis_names: must be a list of 3 str",
  ),
  "quantization_unknown": (["quantization=fp8"], r"quantization: 'fp8' is not one of \['', 'int8'\]"),
  "qk_norm_type_unknown": (["qk_norm_type=rmsnorm"], r"qk_norm_type: 'rmsnorm' is not one of"),
  "nope_interval_negative": (["nope_layer_interval=-1"], r"nope_layer_interval: must be >= 0"),
  "temperature_floor_zero": (
    ["temperature_tuning_floor_scale=0.0"],
    r"temperature_tuning_floor_scale: must be > 0",
  ),
  "temperature_without_nope": (
    ["temperature_tuning=true"],
    r"temperature_tuning: applies to layers without RoPE",
  ),
  "query_axis_names_length": (
    ["query_axis_names=[a, b, c]"],
    r"query_axis_names: must be a list of 4 str",
  ),
  "prefill_out_axis_names_type": (
    ["prefill_out_axis_names=[a, b, c, 4]"],
    r"prefill_out_axis_names: must be a list of 4 str",
  ),
}


@pytest.mark.parametrize("overrides, match", INVALID.values(), ids=INVALID.keys())
def test_validation_rule(overrides, match):
  with pytest.raises(ConfigError, match=match):
    load(*overrides)


@pytest.mark.parametrize(
  "overrides",
  [
    ["head_dim=15", "rope_type=none"],  # odd head_dim is fine without RoPE
    ["partial_rotary_factor=0.5"],  # 8 rotary dims
    ["attention_type=local_sliding", "sliding_window_size=16"],
    ["attention_layer_pattern=[chunk, global]", "chunk_attn_window_size=8"],
    ["attention_type=full", "attention=autoselected"],
    ["rope_type=llama3.1", "rope_factor=1"],
    ["dropout_rate=0.0", "query_pre_attn_scalar=0"],
    ["max_prefill_predict_length=64"],
    ["fused_qkv=true"],
    ["share_kv_projections=true"],
    ["kv_quant_dtype=int4", "quantize_kvcache=true"],
    ["logical_axis_rules=[]"],
  ],
)
def test_valid_edge_cases(overrides):
  load(*overrides)


# --------------------------------------------------------------------------- #
# Mesh keys
# --------------------------------------------------------------------------- #


def test_mesh_fill_on_eight_devices():
  cfg = load("ici_fsdp_parallelism=-1")
  assert cfg.ici_fsdp_parallelism == -1
  load("ici_fsdp_parallelism=-1", "ici_tensor_parallelism=2", "dcn_data_parallelism=2")
  load("ici_fsdp_parallelism=-1", "dcn_data_parallelism=-1")  # one fill per group is allowed
  load("ici_fsdp_parallelism=8")  # exact product, no fill


def test_mesh_default_device_count_is_jax_device_count():
  import jax

  cfg = load_config("tiny", f"ici_fsdp_parallelism={jax.device_count()}")
  assert cfg.ici_fsdp_parallelism == jax.device_count()


def test_new_mesh_axis_accepts_its_parallelism_keys():
  axes = "mesh_axes=[data, fsdp, context, tensor, autoregressive, expert]"
  # order does not matter: the ici key may come before the axis is added
  cfg = load("ici_expert_parallelism=2", axes)
  assert cfg.ici_expert_parallelism == 2
  assert cfg.dcn_expert_parallelism == 1  # filled with the default
  assert cfg.mesh_axes[-1] == "expert"
  rules = "logical_axis_rules=[[exp, expert]]"
  assert load(axes, rules).logical_axis_rules == (("exp", "expert"),)


def test_dropping_a_mesh_axis_drops_its_default_keys():
  cfg = load("mesh_axes=[data, fsdp]", "logical_axis_rules=[[embed, fsdp]]")
  assert "ici_tensor_parallelism" not in cfg and "dcn_context_parallelism" not in cfg
  assert cfg.ici_fsdp_parallelism == -1
  with pytest.raises(ConfigError, match="logical_axis_rules: rule .* names mesh axis 'context'"):
    load("mesh_axes=[data, fsdp]")  # the base rules still name the dropped axes


def test_replace_can_add_a_mesh_axis():
  cfg = load()
  new = cfg.replace(mesh_axes=cfg.mesh_axes + ("expert",), ici_expert_parallelism=4)
  assert new.ici_expert_parallelism == 4
  with pytest.raises(
    ConfigError, match="ici_expert_parallelism: axis 'expert' is not in mesh_axes"
  ):
    cfg.replace(ici_expert_parallelism=4)
