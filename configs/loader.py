"""Load, type-check and validate meshattn configs.

A config is built in layers, later ones winning:

1. ``base.yml`` next to this file: the schema. Every accepted key, its
   default, and (through the default's Python type) the type a value must have.
2. The chain of YAML files named by ``name_or_path``, root first. A file may
   name its parent with ``base_config: <file>``.
3. ``key=value`` strings (or dicts) passed as overrides.

The merged dict is then type-checked against the schema, the per-axis mesh
keys are filled in, it is frozen into a :class:`Config`, and
:func:`validate` checks the cross-key rules. Every problem is raised as a
:class:`ConfigError` whose message names the offending key, so a typo on the
command line fails before any model is built.
"""

from __future__ import annotations

import difflib
import math
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml

CONFIGS_DIR = pathlib.Path(__file__).parent
BASE_CONFIG_PATH = CONFIGS_DIR / "base.yml"
PRESETS_DIR = CONFIGS_DIR / "models"

# Allowed values of the enumerated keys. KNOWN_KERNELS is read at validation
# time (not bound at import), so a kernel registry may rebind it to a longer
# tuple, e.g. ``loader.KNOWN_KERNELS += ("splash",)``.
KNOWN_KERNELS: tuple[str, ...] = ("dot_product", "blockwise", "flash", "autoselected")
DECODE_KERNELS: tuple[str, ...] = ("dot_product", "ragged", "paged", "autoselected")
DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("default", "high", "highest")
ATTENTION_TYPES = ("global", "local_sliding", "chunk", "full")
ROPE_TYPES = ("default", "llama3.1", "yarn", "none")
KV_QUANT_DTYPES = ("int8", "int4")
KV_QUANT_AXES = ("dkv", "heads_and_dkv")

# ici_<axis>_parallelism / dcn_<axis>_parallelism: one pair per mesh axis.
_MESH_KEY = re.compile(r"^(ici|dcn)_(.+)_parallelism$")
# "1e-5" is a str to PyYAML (YAML 1.1 floats need a dot); accept it for floats.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


class ConfigError(ValueError):
  """A config key is unknown, mistyped, or violates a validation rule."""


# --------------------------------------------------------------------------- #
# Frozen config object
# --------------------------------------------------------------------------- #


def _freeze(value: Any) -> Any:
  """Lists become tuples (recursively) so a Config is immutable and hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  """Tuples back to lists: the shape the YAML files and overrides use."""
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


class Config(Mapping):
  """An immutable, validated config with attribute and item access.

  ``cfg.num_query_heads`` and ``cfg["num_query_heads"]`` read a key; ``in``,
  iteration, ``len`` and ``.get`` behave like a read-only dict. Lists are
  stored as tuples, so a Config is hashable and can be a static argument
  under ``jax.jit``. Build one with :func:`load_config`; derive a changed
  copy with :meth:`replace`, which re-validates.
  """

  __slots__ = ("_values", "_num_devices")

  def __init__(self, values: Mapping[str, Any], num_devices: int | None = None):
    object.__setattr__(self, "_values", {k: _freeze(v) for k, v in values.items()})
    object.__setattr__(self, "_num_devices", num_devices)

  # Mapping protocol -------------------------------------------------------
  def __getitem__(self, key: str) -> Any:
    return self._values[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._values)

  def __len__(self) -> int:
    return len(self._values)

  def __getattr__(self, name: str) -> Any:
    # Only called when normal lookup fails, i.e. for config keys.
    if not name.startswith("_"):
      try:
        return self._values[name]
      except KeyError:
        pass
    raise AttributeError(f"Config has no key {name!r}{_suggest(name, self._values)}")

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f"Config is frozen; use cfg.replace({name}=...) instead")

  def __delattr__(self, name: str) -> None:
    raise AttributeError("Config is frozen")

  def __dir__(self) -> list[str]:
    return sorted(set(super().__dir__()) | set(self._values))

  def __hash__(self) -> int:
    return hash(tuple(self._values.items()))

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Mapping):
      return NotImplemented
    return dict(self) == dict(other)

  def __repr__(self) -> str:
    body = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
    return f"Config({body})"

  def __reduce__(self):
    return (Config, (self._values, self._num_devices))

  # Conversions ------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    """A plain, mutable dict with lists (not tuples), as in the YAML files."""
    return {k: _thaw(v) for k, v in self._values.items()}

  def replace(self, **changes: Any) -> Config:
    """A copy with ``changes`` applied, type-checked and validated again.

    Validation uses the device count this config was loaded with, so a
    replace cannot silently produce a mesh that does not fit.
    """
    merged = {**self.to_dict(), **changes}
    return _build(merged, explicit=set(changes), num_devices=self._num_devices)


def _suggest(key: str, known: Sequence[str] | Mapping[str, Any]) -> str:
  """'; did you mean ...?' with difflib's close matches, or ''."""
  matches = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  if not matches:
    return ""
  return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


# --------------------------------------------------------------------------- #
# Reading YAML files and overrides
# --------------------------------------------------------------------------- #


def _read_yaml(path: pathlib.Path) -> dict[str, Any]:
  """One YAML file as a dict; an empty file is an empty dict."""
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML: {e}") from e
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(
      f"{path}: top level must be a mapping of key: value, got {type(data).__name__}"
    )
  return data


def list_presets() -> list[str]:
  """Names of the shipped model presets (configs/models/<name>.yml), sorted."""
  return sorted(p.stem for p in PRESETS_DIR.glob("*.yml"))


def _resolve_start(name_or_path: str | os.PathLike) -> pathlib.Path:
  """Map "base", a preset name or a YAML path to the file to load.

  A string with a path separator or a .yml/.yaml suffix is a path; anything
  else is a preset name. This keeps "tiny" meaning the preset even if a file
  called "tiny" happens to sit in the working directory.
  """
  text = os.fspath(name_or_path)
  if text == "base":
    return BASE_CONFIG_PATH
  looks_like_path = (
    isinstance(name_or_path, os.PathLike)
    or os.sep in text
    or "/" in text
    or text.endswith((".yml", ".yaml"))
  )
  if looks_like_path:
    path = pathlib.Path(text).expanduser()
    if not path.is_file():
      raise ConfigError(f"config file {text!r} does not exist")
    return path
  preset = PRESETS_DIR / f"{text}.yml"
  if not preset.is_file():
    names = ["base", *list_presets()]
    raise ConfigError(
      f"unknown preset {text!r}{_suggest(text, names)} (presets: {', '.join(names)}; "
      "or pass a path to a .yml file)"
    )
  return preset


def _resolve_parent(ref: Any, child: pathlib.Path) -> pathlib.Path:
  """Find the file named by ``base_config``: next to the child, then configs/, then configs/models/."""
  if not isinstance(ref, str) or not ref:
    raise ConfigError(f"{child}: base_config must be a file name (str), got {ref!r}")
  ref_path = pathlib.Path(ref).expanduser()
  if ref_path.is_absolute():
    candidates = [ref_path]
  else:
    candidates = [child.parent / ref_path, CONFIGS_DIR / ref_path, PRESETS_DIR / ref_path]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  tried = ", ".join(str(c) for c in candidates)
  raise ConfigError(f"{child}: base_config {ref!r} not found (tried {tried})")


def _load_chain(start: pathlib.Path) -> list[tuple[pathlib.Path, dict[str, Any]]]:
  """The file and its base_config ancestors, root first, without the base_config keys."""
  chain: list[tuple[pathlib.Path, dict[str, Any]]] = []
  seen: list[pathlib.Path] = []
  path: pathlib.Path | None = start
  while path is not None:
    resolved = path.resolve()
    if resolved in seen:
      cycle = " -> ".join(str(p) for p in [*seen, resolved])
      raise ConfigError(f"base_config cycle: {cycle}")
    seen.append(resolved)
    data = _read_yaml(path)
    parent_ref = data.pop("base_config", None)
    chain.append((resolved, data))
    path = _resolve_parent(parent_ref, path) if parent_ref is not None else None
  return chain[::-1]


def _parse_override(override: str | Mapping[str, Any]) -> dict[str, Any]:
  """A ``key=value`` string (value read by yaml.safe_load) or a dict, as a dict."""
  if isinstance(override, Mapping):
    return dict(override)
  if not isinstance(override, str):
    raise ConfigError(f"override must be 'key=value' or a dict, got {override!r}")
  key, sep, raw = override.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ConfigError(f"override {override!r} is not of the form key=value")
  try:
    value = yaml.safe_load(raw)
  except yaml.YAMLError as e:
    raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
  return {key: value}


# --------------------------------------------------------------------------- #
# Typing against the schema
# --------------------------------------------------------------------------- #


def _schema() -> dict[str, Any]:
  """base.yml's keys and defaults (re-read each time: it is small and may be edited)."""
  return _read_yaml(BASE_CONFIG_PATH)


def _type_name(value: Any) -> str:
  return "list" if isinstance(value, tuple) else type(value).__name__


def _coerce(key: str, value: Any, default: Any) -> Any:
  """Check ``value`` against the type of the schema default; int -> float is the only conversion."""
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
      value = float(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
      value = float(value)
  elif isinstance(default, str):
    ok = isinstance(value, str)
  elif isinstance(default, (list, tuple)):
    ok = isinstance(value, (list, tuple))
    if ok:
      value = list(value)
  else:  # pragma: no cover - base.yml only holds the types above
    ok = True
  if not ok:
    expected = _type_name(default)
    raise ConfigError(f"{key}: expected {expected}, got {_type_name(value)} {value!r}")
  return value


def _mesh_axes_from(merged: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
  """mesh_axes, type-checked early because the per-axis keys depend on it."""
  axes = _coerce("mesh_axes", merged.get("mesh_axes", schema["mesh_axes"]), schema["mesh_axes"])
  if not all(isinstance(a, str) for a in axes):
    raise ConfigError(f"mesh_axes: every entry must be a str axis name, got {axes!r}")
  return axes


def _typed(merged: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
  """Type-check every key and fill in one ici/dcn key per mesh axis.

  Per-axis keys come from the mesh, not the schema: ``ici_<axis>_parallelism``
  is accepted for every axis in mesh_axes and defaults to 1. A base default
  for an axis that mesh_axes no longer lists is dropped; an explicitly set
  one is an error, since it would silently do nothing.
  """
  schema = _schema()
  axes = _mesh_axes_from(merged, schema)
  out: dict[str, Any] = {}
  for key, value in merged.items():
    mesh_key = _MESH_KEY.match(key)
    if mesh_key:
      if mesh_key.group(2) not in axes:
        if key in explicit:
          raise ConfigError(
            f"{key}: axis {mesh_key.group(2)!r} is not in mesh_axes {axes}; "
            "add it to mesh_axes or remove the key"
          )
        continue
      out[key] = _coerce(key, value, 1)
    elif key in schema:
      out[key] = _coerce(key, value, schema[key])
    else:
      known = [*schema, *(f"{p}_{a}_parallelism" for p in ("ici", "dcn") for a in axes)]
      raise ConfigError(f"unknown config key {key!r}{_suggest(key, known)}")
  for prefix in ("ici", "dcn"):
    for axis in axes:
      out.setdefault(f"{prefix}_{axis}_parallelism", 1)
  return out


def _build(merged: Mapping[str, Any], explicit: set[str], num_devices: int | None) -> Config:
  """Type, validate and freeze a merged dict."""
  typed = _typed(merged, explicit)
  validate(typed, num_devices)
  return Config(typed, num_devices)


def load_config(
  name_or_path: str | os.PathLike,
  *overrides: str | Mapping[str, Any],
  num_devices: int | None = None,
) -> Config:
  """Load "base", a preset name (see :func:`list_presets`) or a YAML file, then apply overrides.

  Args:
    name_or_path: "base", a preset such as "llama3-8b", or a path to a YAML
      file. Files may inherit with ``base_config: <file>``.
    *overrides: ``"key=value"`` strings (value parsed by yaml.safe_load, so
      ``"logical_axis_rules=[[embed, fsdp]]"`` works) or dicts, applied in order.
    num_devices: device count the mesh keys must fit; ``jax.device_count()``
      when None.

  Raises:
    ConfigError: unknown key, wrong type, or a failed validation rule.
  """
  merged = dict(_schema())
  explicit: set[str] = set()
  base_resolved = BASE_CONFIG_PATH.resolve()
  for path, data in _load_chain(_resolve_start(name_or_path)):
    merged.update(data)
    if path != base_resolved:
      explicit.update(data)
  for override in overrides:
    data = _parse_override(override)
    merged.update(data)
    explicit.update(data)
  return _build(merged, explicit, num_devices)


# --------------------------------------------------------------------------- #
# Validation (cross-key rules)
# --------------------------------------------------------------------------- #


def _fail(key: str, message: str) -> None:
  raise ConfigError(f"{key}: {message}")


def _one_of(cfg: Mapping[str, Any], key: str, allowed: Sequence[str]) -> None:
  if cfg[key] not in allowed:
    _fail(key, f"{cfg[key]!r} is not one of {list(allowed)}")


def _at_least(cfg: Mapping[str, Any], key: str, low: float) -> None:
  if cfg[key] < low:
    _fail(key, f"must be >= {low}, got {cfg[key]}")


def _positive(cfg: Mapping[str, Any], key: str) -> None:
  if not cfg[key] > 0:
    _fail(key, f"must be > 0, got {cfg[key]}")


def _validate_shape(cfg: Mapping[str, Any]) -> None:
  """Head counts and widths the projections can be built with."""
  _at_least(cfg, "emb_dim", 1)
  _at_least(cfg, "num_query_heads", 1)
  _at_least(cfg, "num_kv_heads", 1)
  if cfg["num_query_heads"] % cfg["num_kv_heads"]:
    _fail(
      "num_kv_heads",
      f"{cfg['num_kv_heads']} must divide num_query_heads={cfg['num_query_heads']}",
    )
  _at_least(cfg, "head_dim", 1)
  _one_of(cfg, "dtype", DTYPES)
  _one_of(cfg, "weight_dtype", DTYPES)
  _one_of(cfg, "matmul_precision", MATMUL_PRECISIONS)
  if cfg["fused_qkv"] and cfg["share_kv_projections"]:
    _fail("fused_qkv", "fused_qkv and share_kv_projections cannot both be true")
  if not cfg["normalization_layer_epsilon"] > 0:
    _fail("normalization_layer_epsilon", f"must be > 0, got {cfg['normalization_layer_epsilon']}")


def _validate_attention(cfg: Mapping[str, Any]) -> None:
  """Kernel, attention types and the window sizes the chosen types need."""
  _one_of(cfg, "attention", KNOWN_KERNELS)
  _one_of(cfg, "decode_attention", DECODE_KERNELS)
  _one_of(cfg, "attention_type", ATTENTION_TYPES)
  for i, kind in enumerate(cfg["attention_layer_pattern"]):
    if kind not in ATTENTION_TYPES:
      _fail("attention_layer_pattern", f"entry {i} {kind!r} is not one of {list(ATTENTION_TYPES)}")
  used = {cfg["attention_type"], *cfg["attention_layer_pattern"]}
  for key, kind in (("sliding_window_size", "local_sliding"), ("chunk_attn_window_size", "chunk")):
    if cfg[key] < 0:
      _fail(key, f"must be >= 0, got {cfg[key]}")
    if kind in used and cfg[key] <= 0:
      _fail(
        key,
        f"must be > 0 when attention_type or attention_layer_pattern uses {kind!r}, got {cfg[key]}",
      )
  _at_least(cfg, "attn_logits_soft_cap", 0)
  _at_least(cfg, "query_pre_attn_scalar", 0)
  if not 0 <= cfg["dropout_rate"] < 1:
    _fail("dropout_rate", f"must be in [0, 1), got {cfg['dropout_rate']}")


def _validate_rope(cfg: Mapping[str, Any]) -> None:
  """RoPE rotates pairs of dims, so every rotated width must be even and non-empty."""
  _one_of(cfg, "rope_type", ROPE_TYPES)
  rope_type = cfg["rope_type"]
  factor = cfg["partial_rotary_factor"]
  if not 0 < factor <= 1:
    _fail("partial_rotary_factor", f"must be in (0, 1], got {factor}")
  if rope_type != "none":
    if cfg["head_dim"] % 2:
      _fail("head_dim", f"must be even when rope_type={rope_type!r}, got {cfg['head_dim']}")
    rotary = int(cfg["head_dim"] * factor)
    if rotary <= 0 or rotary % 2:
      _fail(
        "partial_rotary_factor",
        f"rotary dims int(head_dim * partial_rotary_factor) = {rotary} must be even and > 0",
      )
  _positive(cfg, "rope_min_timescale")
  if not cfg["rope_max_timescale"] > cfg["rope_min_timescale"]:
    _fail(
      "rope_max_timescale",
      f"must be > rope_min_timescale={cfg['rope_min_timescale']}, got {cfg['rope_max_timescale']}",
    )
  if rope_type in ("llama3.1", "yarn"):
    _at_least(cfg, "rope_factor", 1)
    _at_least(cfg, "original_max_position_embeddings", 1)
  if rope_type == "llama3.1":
    _positive(cfg, "rope_low_freq_factor")
    if not cfg["rope_high_freq_factor"] > cfg["rope_low_freq_factor"]:
      _fail(
        "rope_high_freq_factor",
        f"must be > rope_low_freq_factor={cfg['rope_low_freq_factor']} for llama3.1, "
        f"got {cfg['rope_high_freq_factor']}",
      )
  if rope_type == "yarn" and not cfg["beta_fast"] > cfg["beta_slow"]:
    _fail("beta_fast", f"must be > beta_slow={cfg['beta_slow']} for yarn, got {cfg['beta_fast']}")
  _at_least(cfg, "rope_attention_factor", 0)


def _validate_lengths(cfg: Mapping[str, Any]) -> None:
  """Sequence lengths and KV-cache quantization."""
  _at_least(cfg, "max_target_length", 1)
  prefill, target = cfg["max_prefill_predict_length"], cfg["max_target_length"]
  if not 1 <= prefill <= target:
    _fail(
      "max_prefill_predict_length", f"must be in [1, max_target_length={target}], got {prefill}"
    )
  _one_of(cfg, "kv_quant_dtype", KV_QUANT_DTYPES)
  _one_of(cfg, "kv_quant_axis", KV_QUANT_AXES)
  for key in ("prefill_cache_axis_order", "ar_cache_axis_order"):
    if sorted(cfg[key]) != [0, 1, 2, 3]:
      _fail(
        key,
        f"must be a permutation of [0, 1, 2, 3] (batch, sequence, kv heads, head_dim), "
        f"got {_thaw(cfg[key])!r}",
      )
  if cfg["use_chunked_prefill"]:
    _at_least(cfg, "prefill_chunk_size", 1)
  if cfg["paged_kv_cache"]:
    _at_least(cfg, "num_pages", 1)
    _at_least(cfg, "tokens_per_page", 1)


def _validate_mesh(cfg: Mapping[str, Any], num_devices: int | None) -> None:
  """The ici/dcn degrees must multiply (with at most one -1 fill each) to the device count."""
  axes = list(cfg["mesh_axes"])
  if not axes:
    _fail("mesh_axes", "must name at least one mesh axis")
  if not all(isinstance(a, str) for a in axes):
    _fail("mesh_axes", f"every entry must be a str, got {axes}")
  duplicates = sorted({a for a in axes if axes.count(a) > 1})
  if duplicates:
    _fail("mesh_axes", f"axis names must be unique, repeated: {duplicates}")
  fixed: dict[str, int] = {}
  fills: list[str] = []
  for prefix in ("ici", "dcn"):
    prefix_fills = []
    for axis in axes:
      key = f"{prefix}_{axis}_parallelism"
      value = cfg.get(key, 1)
      if value == -1:
        prefix_fills.append(key)
      elif value >= 1:
        fixed[key] = value
      else:
        _fail(key, f"must be -1 (fill) or >= 1, got {value}")
    if len(prefix_fills) > 1:
      _fail(prefix_fills[1], f"at most one {prefix}_*_parallelism may be -1, got {prefix_fills}")
    fills += prefix_fills

  devices = _device_count(num_devices)
  product = math.prod(fixed.values())
  shown = " * ".join(f"{k}={v}" for k, v in fixed.items() if v != 1) or "all 1"
  if not fills and product != devices:
    _fail(
      next((k for k, v in fixed.items() if v != 1), f"ici_{axes[0]}_parallelism"),
      f"product of ici_*/dcn_* parallelism ({shown}) = {product} must equal the device count "
      f"{devices}; set one key to -1 to fill the rest",
    )
  if fills and devices % product:
    _fail(
      fills[0],
      f"-1 fill impossible: device count {devices} is not divisible by the product of the "
      f"other ici_*/dcn_* parallelism ({shown}) = {product}",
    )


def _device_count(num_devices: int | None) -> int:
  """``num_devices`` if given, else the devices JAX sees (imported late: it is slow to start)."""
  if num_devices is not None:
    return num_devices
  import jax

  return jax.device_count()


def _validate_rules(cfg: Mapping[str, Any]) -> None:
  """logical_axis_rules entries are [name, axes] and only name mesh axes that exist."""
  axes = list(cfg["mesh_axes"])
  for rule in cfg["logical_axis_rules"]:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
      _fail(
        "logical_axis_rules",
        f"rule {rule!r} must be [logical_name, mesh_axis | [mesh_axes] | null]",
      )
    name, target = rule
    if target is None:
      continue
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
      _fail("logical_axis_rules", f"rule {list(rule)!r}: axes must be a str, a list of str or null")
    for mesh_axis in targets:
      if mesh_axis not in axes:
        _fail(
          "logical_axis_rules",
          f"rule [{name!r}, {_thaw(target)!r}] names mesh axis {mesh_axis!r} "
          f"not in mesh_axes {axes}",
        )


def _validate_axis_names(cfg: Mapping[str, Any]) -> None:
  """*_axis_names give one logical name per array dimension: 3 for inputs, 4 for Q/K/V/out."""
  for key in cfg:
    if not key.endswith("_axis_names"):
      continue
    length = 3 if key.endswith("input_axis_names") else 4
    names = cfg[key]
    if len(names) != length or not all(isinstance(n, str) for n in names):
      _fail(key, f"must be a list of {length} str logical axis names, got {_thaw(names)!r}")


def validate(cfg: Mapping[str, Any], num_devices: int | None = None) -> None:
  """Check the cross-key rules of a typed, complete config dict; raise ConfigError on the first failure.

  Separate from parsing so tests and tools can validate a hand-edited dict
  (e.g. ``{**cfg.to_dict(), "num_kv_heads": 3}``). ``num_devices`` defaults
  to ``jax.device_count()``.
  """
  _validate_shape(cfg)
  _validate_attention(cfg)
  _validate_rope(cfg)
  _validate_lengths(cfg)
  _validate_mesh(cfg, num_devices)
  _validate_rules(cfg)
  _validate_axis_names(cfg)
