"""Enumerated config keys are declared once (configs/vocabulary.KEY_VALUES) and all checked:
each is a base.yml key whose default is allowed, a value outside its set is refused naming
the key and the set, and a string key of base.yml is either listed there or known free text.

No JAX: configs are loaded, nothing is built.
"""

import re

import pytest

from meshattn.configs import ConfigError, load_config
from meshattn.configs import vocabulary as vocab
from meshattn.layers.settings import AttentionSettings

N = 8  # device count the mesh checks use
# String keys whose value is not one of a fixed set: paths, and the train kernel, whose
# allowed names are read at validation time (validation.KNOWN_KERNELS, extensible).
FREE_OR_LATE = {"output_dir", "checkpoint_dir", "attention"}


def test_string_keys_are_enumerated_or_known_free_text():
  base = load_config("base", num_devices=N)
  strings = {key for key, value in base.items() if isinstance(value, str)}
  assert strings - FREE_OR_LATE == set(vocab.KEY_VALUES), (
      "a string key of base.yml is neither in vocabulary.KEY_VALUES nor free text")
  for key, allowed in vocab.KEY_VALUES.items():
    assert base[key] in allowed, (key, base[key])


@pytest.mark.parametrize("key", [*vocab.KEY_VALUES, "attention"])
def test_a_value_outside_the_set_names_the_key_and_the_allowed_values(key):
  allowed = vocab.KEY_VALUES.get(key, vocab.TRAIN_KERNELS)
  want = f"{key}: 'not_a_value' is not one of {list(allowed)}"
  with pytest.raises(ConfigError, match=re.escape(want)):
    load_config("base", f"{key}=not_a_value", num_devices=N)


def test_null_defaults_are_declared_nullable_and_take_their_type():
  """A base.yml key left null (decided by the other keys) is in vocabulary.NULLABLE_KEYS,
  which says what a set value must be; null and a value of that type load, others do not."""
  base = load_config("base", num_devices=N)
  nulls = {key for key, value in base.items() if value is None}
  assert nulls | set(vocab.NULL_RESOLVED) == set(vocab.NULLABLE_KEYS)
  for key, kind in vocab.NULLABLE_KEYS.items():
    value = kind(1)  # a value of the declared type (True for bool)
    assert load_config("base", {key: value}, num_devices=N)[key] == value
    loaded = load_config("base", {key: None}, num_devices=N)
    derive = vocab.NULL_RESOLVED.get(key)
    assert loaded[key] == (None if derive is None else derive(loaded))
    with pytest.raises(ConfigError, match=f"{key}: expected {kind.__name__} or null, got str"):
      load_config("base", {key: "x"}, num_devices=N)


@pytest.mark.parametrize("target", [256, 1024, 4096])
def test_prefill_length_default_is_the_same_through_config_and_keywords(target):
  """max_prefill_predict_length unset: min(1024, max_target_length) either way, so a short
  max_target_length alone loads (it raised through a config, built through keywords)."""
  cfg = load_config("base", {"max_target_length": target}, num_devices=N)
  assert cfg["max_prefill_predict_length"] == min(1024, target)
  settings = AttentionSettings.from_config(cfg)
  keywords = AttentionSettings(emb_dim=cfg["emb_dim"], num_query_heads=cfg["num_query_heads"],
                               max_target_length=target)
  assert settings.max_prefill_predict_length == keywords.max_prefill_predict_length
