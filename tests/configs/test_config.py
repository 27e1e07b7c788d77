"""Tests of the config loader: presets, inheritance, overrides, typing, freezing
(validation rules and mesh keys: test_config_validation.py).

Everything here is pure Python (no JAX compilation), so the file runs in about a second.
All loads pass num_devices=8 explicitly unless the test is about the default.
"""

import pickle

import pytest
import yaml

from meshattn.configs import PRESETS_DIR, Config, ConfigError, list_presets, load_config, validate
from meshattn.configs import loader, validation, vocabulary

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
    if value is None and key in vocabulary.NULL_RESOLVED:  # a null the loader derives
      value = vocabulary.NULL_RESOLVED[key](cfg)
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
  assert (scout.qk_norm_type, scout.nope_layer_interval, scout.temperature_tuning) == ("l2", 4, True)
  assert (scout.rope_type, scout.rope_factor, scout.rope_low_freq_factor,
          scout.rope_high_freq_factor) == ("llama3.1", 16.0, 1.0, 1.0)
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


def test_nope_layers_follow_the_interval():
  """nope_layer_interval 4: layers 3, 7, ... have no RoPE, no QK norm (so no norm params) and
  are the layers temperature tuning applies to; the others keep both."""
  from flax import nnx

  from meshattn.layers import Attention, AttentionSettings

  cfg = load("nope_layer_interval=4", "temperature_tuning=true", "use_qk_norm=true",
             "qk_norm_type=layernorm")
  for layer in range(8):
    s = AttentionSettings.from_config(cfg, layer_idx=layer)
    nope = layer % 4 == 3
    assert (s.rope.enabled, s.use_qk_norm, s.temperature_tuning) == (not nope, not nope, nope)
  names = lambda layer: {".".join(map(str, k)) for k, _ in nnx.state(
      Attention(cfg, rngs=nnx.Rngs(0), layer_idx=layer), nnx.Param).flat_state()}
  assert "query_norm.scale" in names(0) and "query_norm.scale" not in names(3)
