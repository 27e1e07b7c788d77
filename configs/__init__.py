"""meshattn configs: YAML presets, overrides and validation.

from meshattn.configs import load_config
cfg = load_config("llama3-8b", "num_kv_heads=4", num_devices=8)
"""

from .loader import (
  PRESETS_DIR,
  Config,
  ConfigError,
  list_presets,
  load_config,
  validate,
)

__all__ = ["PRESETS_DIR", "Config", "ConfigError", "list_presets", "load_config", "validate"]
