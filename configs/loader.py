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
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml

from meshattn.configs import vocabulary as vocab
from meshattn.configs.validation import (  # noqa: F401  (re-exported)
  ATTENTION_TYPES,
  DECODE_KERNELS,
  DTYPES,
  KNOWN_KERNELS,
  KV_QUANT_AXES,
  KV_QUANT_DTYPES,
  MATMUL_PRECISIONS,
  ROPE_TYPES,
  ConfigError,
  _thaw,
  validate,
)

CONFIGS_DIR = pathlib.Path(__file__).parent
BASE_CONFIG_PATH = CONFIGS_DIR / "base.yml"
PRESETS_DIR = CONFIGS_DIR / "models"

# ici_<axis>_parallelism / dcn_<axis>_parallelism: one pair per mesh axis.
_MESH_KEY = re.compile(r"^(ici|dcn)_(.+)_parallelism$")
# "1e-5" is a str to PyYAML (YAML 1.1 floats need a dot); accept it for floats.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


# --------------------------------------------------------------------------- #
# Frozen config object
# --------------------------------------------------------------------------- #


def _freeze(value: Any) -> Any:
  """Lists become tuples (recursively) so a Config is immutable and hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
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


class _DuplicateKey(yaml.YAMLError):
  """A mapping names one key twice (lines are 1-based)."""

  def __init__(self, key: Any, line: int, first_line: int):
    super().__init__(f"key {key!r} on line {line} repeats line {first_line}")
    self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
  """yaml.safe_load that raises on a key repeated within one mapping instead of keeping the last
  (a second `rope_factor:` further down a preset would silently win)."""

  def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
      if key_node.tag == "tag:yaml.org,2002:merge":
        continue  # `<<: *anchor` entries are meant to be overridden by the explicit keys
      key = self.construct_object(key_node, deep=deep)
      try:
        hash(key)
      except TypeError:
        continue  # an unhashable key: SafeLoader's own error reports it below
      line = key_node.start_mark.line + 1
      if key in first:
        raise _DuplicateKey(key, line, first[key])
      first[key] = line
    return super().construct_mapping(node, deep=deep)


def _load_yaml(stream: Any) -> Any:
  return yaml.load(stream, Loader=_UniqueKeyLoader)


def _read_yaml(path: pathlib.Path) -> dict[str, Any]:
  """One YAML file as a dict; an empty file is an empty dict."""
  try:
    with open(path, encoding="utf-8") as f:
      data = _load_yaml(f)
  except _DuplicateKey as e:
    raise ConfigError(f"{e.key}: set twice in {path}, on line {e.first_line} and line {e.line}; "
                      "a key may appear once per file") from e
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
    value = _load_yaml(raw)
  except _DuplicateKey as e:
    raise ConfigError(f"override {key}: {e.key!r} is set twice in {raw!r}") from e
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
  """Check ``value`` against the type of the schema default; int -> float is the only conversion.
  A null default (vocabulary.NULLABLE_KEYS) takes null or a value of the key's declared type."""
  if default is None:
    kind = vocab.NULLABLE_KEYS[key]
    if value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
      return value
    raise ConfigError(f"{key}: expected {kind.__name__} or null, got {_type_name(value)} {value!r}")
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
    if not isinstance(key, str):
      raise ConfigError(f"{key!r}: config keys are strings (key names such as 'num_kv_heads'), "
                        f"got {type(key).__name__} {key!r}")
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
  for key, derive in vocab.NULL_RESOLVED.items():
    if out.get(key) is None:
      out[key] = derive(out)
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
