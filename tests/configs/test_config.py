"""Tests of the config loader: presets, inheritance, overrides, typing, freezing, validation.

Everything here is pure Python (no JAX compilation), so the file runs in about a second.
All loads pass num_devices=8 explicitly unless the test is about the default.
"""

import pickle

import pytest
import yaml

from meshattn.configs import PRESETS_DIR, Config, ConfigError, list_presets, load_config, validate
from meshattn.configs import loader, validation

N = 8  # device count the mesh checks use


def load(*overrides, name="tiny"):
  return load_config(name, *overrides, num_devices=N)


def write(path, text):
  path.write_text(text)
  return path


# --------------------------------------------------------------------------- #
# Presets
# --------------------------------------------------------------------------- #


def test_base_loads_with_schema_defaults():
  cfg = load(name="base")
  schema = yaml.safe_load(loader.BASE_CONFIG_PATH.read_text())
  for key, value in schema.items():
    assert cfg[key] == loader._freeze(value), key


def test_expected_presets_are_shipped():
  expected = {
    "tiny",
    "llama3-8b",
    "mistral-7b",
    "gemma2-9b",
    "qwen3-8b",
    "gpt-oss-20b",
    "llama4-scout",
  }
  assert expected <= set(list_presets())
  assert PRESETS_DIR.is_dir()


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name):
  cfg = load(name=name)
  assert isinstance(cfg, Config)
  assert cfg.num_query_heads % cfg.num_kv_heads == 0


@pytest.mark.parametrize("name", list_presets())
def test_preset_files_only_override_non_mesh_keys(name):
  path = PRESETS_DIR / f"{name}.yml"
  text = path.read_text()
  assert text.startswith("#"), "preset needs a header comment naming the model and source"
  data = yaml.safe_load(text)
  assert data.pop("base_config") == "base.yml"
  schema = yaml.safe_load(loader.BASE_CONFIG_PATH.read_text())
  for key in data:
    assert key in schema, key
    assert key != "mesh_axes" and not loader._MESH_KEY.match(key), f"{name} sets mesh key {key}"


def test_preset_values():
  llama = load(name="llama3-8b")
  assert (llama.emb_dim, llama.num_query_heads, llama.num_kv_heads, llama.head_dim) == (
    4096,
    32,
    8,
    128,
  )
  assert llama.rope_type == "llama3.1" and llama.rope_max_timescale == 500000
  assert (llama.rope_factor, llama.rope_low_freq_factor, llama.rope_high_freq_factor) == (
    8.0,
    1.0,
    4.0,
  )
  assert llama.original_max_position_embeddings == 8192 and llama.max_target_length == 8192
  gemma = load(name="gemma2-9b")
  assert gemma.attention_layer_pattern == ("local_sliding", "global")
  assert (gemma.attn_logits_soft_cap, gemma.query_pre_attn_scalar, gemma.head_dim) == (
    50.0,
    256.0,
    256,
  )
  oss = load(name="gpt-oss-20b")
  assert oss.attention_sink and oss.use_bias and oss.rope_type == "yarn" and oss.rope_factor == 32.0
  scout = load(name="llama4-scout")
  assert scout.attention_layer_pattern == ("chunk", "chunk", "chunk", "global")
  assert scout.chunk_attn_window_size == 8192 and scout.use_qk_norm
  tiny = load()
  assert (tiny.emb_dim, tiny.num_query_heads, tiny.num_kv_heads, tiny.head_dim) == (64, 4, 2, 16)
  assert (tiny.max_target_length, tiny.max_prefill_predict_length) == (64, 32)


def test_unknown_preset_suggests_close_name():
  with pytest.raises(ConfigError, match="llama3-8b"):
    load(name="llama3-8")


def test_missing_file_path_rejected(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load(name=str(tmp_path / "nope.yml"))


# --------------------------------------------------------------------------- #
# Inheritance and override precedence
# --------------------------------------------------------------------------- #


def test_child_overrides_parent_and_overrides_win(tmp_path):
  write(
    tmp_path / "parent.yml",
    "base_config: base.yml\nemb_dim: 128\nnum_query_heads: 8\nnum_kv_heads: 8\n",
  )
  child = write(tmp_path / "child.yml", "base_config: parent.yml\nemb_dim: 256\n")
  cfg = load(name=str(child))
  assert cfg.emb_dim == 256  # child beats parent
  assert cfg.num_query_heads == 8  # inherited from parent
  assert cfg.head_dim == 128  # base default
  cfg = load("emb_dim=512", {"num_kv_heads": 2}, "num_kv_heads=4", name=str(child))
  assert cfg.emb_dim == 512 and cfg.num_kv_heads == 4  # later overrides win


def test_base_config_resolves_to_models_dir(tmp_path):
  child = write(tmp_path / "mine.yml", "base_config: tiny.yml\nnum_kv_heads: 1\n")
  cfg = load(name=child)  # a pathlib.Path works too
  assert cfg.emb_dim == 64 and cfg.num_kv_heads == 1


def test_base_config_prefers_file_next_to_child(tmp_path):
  write(tmp_path / "tiny.yml", "base_config: base.yml\nemb_dim: 96\n")
  child = write(tmp_path / "mine.yml", "base_config: tiny.yml\n")
  assert load(name=str(child)).emb_dim == 96


def test_file_without_base_config_starts_from_defaults(tmp_path):
  path = write(tmp_path / "plain.yaml", "emb_dim: 32\n")
  cfg = load(name=str(path))
  assert cfg.emb_dim == 32 and cfg.num_query_heads == 16


def test_base_config_cycle_rejected(tmp_path):
  write(tmp_path / "a.yml", "base_config: b.yml\n")
  write(tmp_path / "b.yml", "base_config: a.yml\n")
  with pytest.raises(ConfigError, match="cycle"):
    load(name=str(tmp_path / "a.yml"))


def test_missing_base_config_rejected(tmp_path):
  path = write(tmp_path / "a.yml", "base_config: nowhere.yml\n")
  with pytest.raises(ConfigError, match="base_config 'nowhere.yml' not found"):
    load(name=str(path))


def test_unknown_key_in_file_rejected(tmp_path):
  path = write(tmp_path / "a.yml", "base_config: base.yml\nhead_dims: 64\n")
  with pytest.raises(ConfigError, match="head_dims.*head_dim"):
    load(name=str(path))


def test_non_mapping_file_rejected(tmp_path):
  path = write(tmp_path / "a.yml", "- 1\n- 2\n")
  with pytest.raises(ConfigError, match="mapping"):
    load(name=str(path))


# --------------------------------------------------------------------------- #
# Override parsing and typing
# --------------------------------------------------------------------------- #


def test_override_values_parsed_as_yaml():
  cfg = load(
    "num_kv_heads=1",
    "rope_type=none",
    "logical_axis_rules=[[a, data], [b, [data, fsdp]], [c, null]]",
  )
  assert cfg.num_kv_heads == 1 and cfg.rope_type == "none"
  assert cfg.logical_axis_rules == (("a", "data"), ("b", ("data", "fsdp")), ("c", None))


def test_int_override_converted_to_float():
  cfg = load("attn_logits_soft_cap=30")
  assert cfg.attn_logits_soft_cap == 30.0 and isinstance(cfg.attn_logits_soft_cap, float)


def test_exponent_float_without_dot_accepted():
  # PyYAML reads "1e-5" as a string; a float key takes it anyway.
  assert load("normalization_layer_epsilon=1e-5").normalization_layer_epsilon == 1e-5


@pytest.mark.parametrize(
  "override, match",
  [
    ("num_kv_heads=two", "num_kv_heads: expected int, got str"),
    ("num_kv_heads=2.0", "num_kv_heads: expected int, got float"),
    ("num_kv_heads=true", "num_kv_heads: expected int, got bool"),
    ("dropout_rate=true", "dropout_rate: expected float, got bool"),
    ("dropout_rate=small", "dropout_rate: expected float, got str"),
    ("use_bias=1", "use_bias: expected bool, got int"),
    ("rope_type=1", "rope_type: expected str, got int"),
    ("dtype=", "dtype: expected str, got NoneType"),
    ("mesh_axes=data", "mesh_axes: expected list, got str"),
    ("attention_layer_pattern=global", "attention_layer_pattern: expected list"),
    ("ici_tensor_parallelism=2.0", "ici_tensor_parallelism: expected int, got float"),
  ],
)
def test_wrong_type_rejected(override, match):
  with pytest.raises(ConfigError, match=match):
    load(override)


def test_unknown_key_rejected_with_close_match():
  with pytest.raises(
    ConfigError, match="unknown config key 'num_kv_head'.*did you mean 'num_kv_heads'"
  ):
    load("num_kv_head=2")


def test_malformed_override_rejected():
  with pytest.raises(ConfigError, match="key=value"):
    load("num_kv_heads")
  with pytest.raises(ConfigError, match="key=value"):
    load(3)


# --------------------------------------------------------------------------- #
# The frozen Config
# --------------------------------------------------------------------------- #


def test_config_is_frozen():
  cfg = load()
  with pytest.raises(AttributeError, match="frozen"):
    cfg.emb_dim = 1
  with pytest.raises(TypeError):
    cfg["emb_dim"] = 1
  with pytest.raises(AttributeError):
    del cfg.emb_dim
  assert cfg.emb_dim == 64


def test_config_access_and_conversions():
  cfg = load()
  assert cfg.num_query_heads == cfg["num_query_heads"] == 4
  assert "emb_dim" in cfg and "nope" not in cfg
  assert list(cfg) == list(cfg.to_dict())
  assert cfg.get("nope", 7) == 7
  with pytest.raises(AttributeError, match="num_kv_heads"):
    cfg.num_kv_head
  assert isinstance(cfg.mesh_axes, tuple)
  assert cfg.logical_axis_rules[0] == ("activation_batch", ("data", "fsdp"))
  plain = cfg.to_dict()
  assert plain["logical_axis_rules"][0] == ["activation_batch", ["data", "fsdp"]]
  plain["emb_dim"] = 1
  assert cfg.emb_dim == 64  # to_dict is a copy


def test_config_hashable_equal_and_picklable():
  a, b = load(), load()
  assert a == b and hash(a) == hash(b)
  assert a != load("emb_dim=128")
  restored = pickle.loads(pickle.dumps(a))
  assert restored == a and restored.emb_dim == 64


def test_to_dict_round_trips_through_load_config():
  cfg = load("num_kv_heads=1")
  assert load_config("base", cfg.to_dict(), num_devices=N) == cfg


def test_replace_returns_new_validated_config():
  cfg = load()
  new = cfg.replace(num_kv_heads=1, attn_logits_soft_cap=5)
  assert new.num_kv_heads == 1 and new.attn_logits_soft_cap == 5.0
  assert cfg.num_kv_heads == 2
  with pytest.raises(ConfigError, match="num_kv_heads"):
    cfg.replace(num_kv_heads=3)
  with pytest.raises(ConfigError, match="unknown config key 'emb_dimm'"):
    cfg.replace(emb_dimm=3)
  with pytest.raises(ConfigError, match="num_kv_heads: expected int"):
    cfg.replace(num_kv_heads="2")


def test_replace_keeps_device_count():
  cfg = load()
  assert cfg.replace(ici_tensor_parallelism=2).ici_tensor_parallelism == 2
  with pytest.raises(ConfigError, match="product"):
    cfg.replace(ici_fsdp_parallelism=1, ici_tensor_parallelism=2)


def test_validate_accepts_plain_dicts():
  cfg = load()
  validate(cfg, N)
  validate(cfg.to_dict(), N)
  with pytest.raises(ConfigError, match="num_kv_heads"):
    validate({**cfg.to_dict(), "num_kv_heads": 3}, N)


def test_kernel_registry_can_extend_known_kernels(monkeypatch):
  with pytest.raises(ConfigError, match="attention: 'splash'"):
    load("attention=splash")
  monkeypatch.setattr(validation, "KNOWN_KERNELS", validation.KNOWN_KERNELS + ("splash",))
  assert load("attention=splash").attention == "splash"


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
    r"attention: 'splash' is not one of \['dot_product', 'blockwise', 'flash', 'autoselected'\]",
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
    r"attention_type: 'causal' is not one of \['global', 'local_sliding', 'chunk', 'full'\]",
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
  "soft_cap_negative": (["attn_logits_soft_cap=-1.0"], r"attn_logits_soft_cap: must be >= 0"),
  "query_scalar_negative": (["query_pre_attn_scalar=-1"], r"query_pre_attn_scalar: must be >= 0"),
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
    ["rope_type=llama3.1", "rope_high_freq_factor=1.0"],
    r"rope_high_freq_factor: must be > rope_low_freq_factor=1.0",
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
  "prefill_zero": (
    ["max_prefill_predict_length=0"],
    r"max_prefill_predict_length: must be in \[1, max_target_length=64\]",
  ),
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
