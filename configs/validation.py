"""Validation of a typed config: the rules of one value (shared with the
keyword constructors, check_values) and the cross-key rules (validate). Every
error names its key and the allowed values or range (ConfigError, a ValueError)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshattn.configs import vocabulary as vocab
from meshattn.configs.vocabulary import (  # noqa: F401  (re-exported: the loader, the model, tests)
  ATTENTION_TYPES, DECODE_KERNELS, KV_QUANT_AXES, KV_QUANT_DTYPES, LR_SCHEDULES, MATMUL_PRECISIONS,
  MLP_ACTIVATIONS, QK_NORM_TYPES, QUANTIZATION_MODES, REMAT_POLICIES, ROPE_TYPES)

# Allowed values of the enumerated keys (configs/vocabulary.py). KNOWN_KERNELS
# is read at validation time (not bound at import), so a kernel registry may
# rebind it to a longer tuple, e.g. ``validation.KNOWN_KERNELS += ("splash",)``.
KNOWN_KERNELS: tuple[str, ...] = vocab.TRAIN_KERNELS
DTYPES = vocab.DTYPE_NAMES


class ConfigError(ValueError):
  """A config key is unknown, mistyped, or violates a validation rule."""


# Rules of one value, written once and read by both paths: validate() below
# (YAML files, key=value overrides, Config.replace) and the keyword constructors
# (layers/settings.py AttentionSettings, layers/rope.py RopeSpec), whose field
# names are the config keys (RopeSpec's carry its name as a prefix).
#
# Every float value must be finite unless its key is listed here (nan never is):
# no key allows inf today, since each float is a size, rate or factor that an
# inf turns into NaN outputs rather than into a meaningful limit.
ALLOWS_INF: frozenset[str] = frozenset()
# Integer sizes that are >= 1 whenever given (a keyword left None takes its
# derived default); 0 would only fail later as a division or an empty array.
POSITIVE_INTS: tuple[str, ...] = (
  "emb_dim", "num_query_heads", "num_kv_heads", "head_dim", "max_target_length",
  "max_prefill_predict_length", "prefill_chunk_size", "num_pages", "tokens_per_page",
  "original_max_position_embeddings", "linear_attention_chunk_size",
  # keyword-only (AttentionSettings): Flax-style sizes and MRoPE position streams
  "qkv_features", "out_features", "kv_emb_dim", "position_streams",
)
# Floats that are > 0, or "unset": 0 in a config (base.yml), None or 0 as a
# keyword. Value: what unset means, for the error message.
POSITIVE_OR_UNSET: Mapping[str, str] = {
  "attn_logits_soft_cap": "no soft cap",
  "query_pre_attn_scalar": "softmax scale head_dim**-0.5",
}


def _thaw(value: Any) -> Any:
  """Tuples back to lists: the shape the YAML files and overrides use."""
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


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


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_values(items: Iterable[tuple[str, Any]], owner: str = "") -> None:
  """Apply the one-value rules (ALLOWS_INF, POSITIVE_INTS, POSITIVE_OR_UNSET) to (key, value)
  pairs; raise ConfigError naming ``owner.key`` (or ``key``) and what is allowed.

  Rules go by key name and value type, not by where the value came from, so a
  config dict and a dataclass's fields are checked alike.
  """
  for key, value in items:
    name = f"{owner}.{key}" if owner else key
    if value is None:
      continue
    if _is_number(value) and not isinstance(value, numbers.Integral):
      if math.isnan(value) or (math.isinf(value) and key not in ALLOWS_INF):
        _fail(name, f"must be a finite number, got {value}")
    if key in POSITIVE_INTS:
      if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        _fail(name, f"must be an integer >= 1, got {value!r}")
      if value < 1:
        _fail(name, f"must be >= 1, got {value}")
    if key in POSITIVE_OR_UNSET and not (_is_number(value) and value >= 0):
      _fail(name, f"must be > 0, or 0 (None as a keyword) for {POSITIVE_OR_UNSET[key]}, "
            f"got {value!r}")


def _validate_enumerated(cfg: Mapping[str, Any]) -> None:
  """Every enumerated key holds one of its allowed values (vocabulary.KEY_VALUES)."""
  for key, allowed in vocab.KEY_VALUES.items():
    _one_of(cfg, key, allowed)
  _one_of(cfg, "attention", KNOWN_KERNELS)  # read now: a kernel registry may extend it


def _validate_shape(cfg: Mapping[str, Any]) -> None:
  """Head counts and widths the projections can be built with."""
  if cfg["num_query_heads"] % cfg["num_kv_heads"]:
    _fail(
      "num_kv_heads",
      f"{cfg['num_kv_heads']} must divide num_query_heads={cfg['num_query_heads']}",
    )
  if cfg["fused_qkv"] and cfg["share_kv_projections"]:
    _fail("fused_qkv", "fused_qkv and share_kv_projections cannot both be true")
  if cfg["quantization"] and cfg["matmul_precision"] != "default":
    _fail("quantization", f"{cfg['quantization']!r} runs integer matmuls and takes no "
          f"matmul_precision (got {cfg['matmul_precision']!r}): use matmul_precision default")
  _at_least(cfg, "nope_layer_interval", 0)
  for key in vocab.POSITIVE_FLOATS:
    _positive(cfg, key)
  if cfg["temperature_tuning"] and not (cfg["nope_layer_interval"] > 0
                                        or cfg["rope_type"] == "none"):
    _fail("temperature_tuning", "applies to layers without RoPE: set nope_layer_interval > 0 "
          "(Llama 4) or rope_type none")


def _validate_attention(cfg: Mapping[str, Any]) -> None:
  """Kernel, attention types and the window sizes the chosen types need."""
  for i, kind in enumerate(cfg["attention_layer_pattern"]):
    if kind not in vocab.LAYER_TYPES:
      _fail("attention_layer_pattern",
            f"entry {i} {kind!r} is not one of {list(vocab.LAYER_TYPES)}")
  used = {cfg["attention_type"], *cfg["attention_layer_pattern"]}
  for kind, key in vocab.MASK_SIZE_KEYS.items():
    if cfg[key] < 0:
      _fail(key, f"must be >= 0, got {cfg[key]}")
    if kind in used and vocab.mask_size_problem(kind, cfg[key]):
      _fail(
        key,
        f"must be > 0 when attention_type or attention_layer_pattern uses {kind!r}, got {cfg[key]}",
      )
  if not vocab.dropout_in_range(cfg["dropout_rate"]):
    _fail("dropout_rate", f"must be in {vocab.DROPOUT_RANGE}, got {cfg['dropout_rate']}")


def _validate_linear(cfg: Mapping[str, Any]) -> None:
  """Linear attention's keys, the softmax features its layers refuse, and the output gate."""
  problem = vocab.linear_normalize_problem(cfg["linear_normalize"], cfg["linear_feature_map"])
  if problem:
    _fail("linear_normalize", problem)
  if cfg["linear_decay"] != 0:
    problem = vocab.linear_decay_problem([cfg["linear_decay"]])
    if problem:
      _fail("linear_decay", f"{problem} (or 0 for no decay)")
  per_head = list(cfg["linear_decay_per_head"])
  if per_head:
    if cfg["linear_decay"] != 0:
      _fail("linear_decay_per_head", "set it or linear_decay, not both")
    if not all(_is_number(g) for g in per_head):
      _fail("linear_decay_per_head", f"must be a list of numbers, got {per_head!r}")
    problem = (vocab.linear_decay_problem(per_head)
               or vocab.linear_heads_problem(per_head, cfg["num_kv_heads"]))
    if problem:
      _fail("linear_decay_per_head", problem)
  if "linear" in {cfg["attention_type"], *cfg["attention_layer_pattern"]}:
    # Softmax features: a linear layer would drop them, so the config may not ask for them.
    for key, on in (("attention_sink", cfg["attention_sink"]),
                    ("attn_logits_soft_cap", cfg["attn_logits_soft_cap"] > 0),
                    ("dropout_rate", cfg["dropout_rate"] > 0)):
      if on:
        _fail(key, "acts on softmax logits or weights; a linear layer (attention_type or "
              "attention_layer_pattern uses 'linear') has none: unset it")


def _validate_rope(cfg: Mapping[str, Any]) -> None:
  """RoPE rotates pairs of dims, so every rotated width must be even and non-empty."""
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
    if cfg["use_mrope"]:
      sections = cfg["mrope_section"]
      if not sections or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                             for n in sections):
        _fail("mrope_section", f"use_mrope needs positive integers, got {_thaw(sections)}")
      if sum(sections) != rotary // 2:
        _fail("mrope_section", f"{_thaw(sections)} sums to {sum(sections)}; it must cover the "
              f"{rotary // 2} rotated frequencies (rotary dims // 2)")
  elif cfg["use_mrope"]:
    _fail("use_mrope", "needs RoPE: rope_type is 'none'")
  keys = vocab.ROPE_CONFIG_KEYS
  problem = vocab.rope_problem(rope_type, {field: cfg[key] for field, key in keys.items()}, keys)
  if problem:
    _fail(keys[problem[0]], problem[1])


def _validate_lengths(cfg: Mapping[str, Any]) -> None:
  """Sequence lengths, KV-cache quantization and layout (a paged decode cache has no axis
  order and no ring)."""
  problem = vocab.prefill_length_problem(cfg["max_prefill_predict_length"],
                                         cfg["max_target_length"])
  if problem:
    _fail("max_prefill_predict_length", problem)
  for key in ("prefill_cache_axis_order", "ar_cache_axis_order"):
    if not vocab.is_axis_permutation(cfg[key]):
      _fail(
        key,
        f"must be a permutation of [0, 1, 2, 3] ({', '.join(vocab.CACHE_DIMS)}) given as ints, "
        f"got {_thaw(cfg[key])!r}",
      )
  # A paged decode cache has no axis order; a prefill cache is contiguous whatever the kind.
  problem = cfg["paged_kv_cache"] and vocab.paged_axis_order_problem(cfg["ar_cache_axis_order"])
  if problem:
    _fail("ar_cache_axis_order",
          f"{problem} (paged_kv_cache is true), got {_thaw(cfg['ar_cache_axis_order'])!r}")
  problem = vocab.paged_ring_problem(cfg["paged_kv_cache"], cfg["sliding_window_ring_buffer"])
  if problem:
    _fail("sliding_window_ring_buffer", f"true {problem} (paged_kv_cache is true)")


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
      problem = vocab.parallelism_problem(value)
      if problem:
        _fail(key, problem)
      if value == -1:
        prefix_fills.append(key)
      else:
        fixed[key] = value
    if len(prefix_fills) > 1:
      _fail(prefix_fills[1], f"at most one {prefix}_*_parallelism may be -1, got {prefix_fills}")
    fills += prefix_fills

  devices = _device_count(num_devices)
  problem = vocab.mesh_product_problem({**fixed, **{k: -1 for k in fills}}, devices)
  if problem:
    # Name the first fill, else the first degree that is not 1.
    first = fills[0] if fills else next((k for k, v in fixed.items() if v != 1),
                                         f"ici_{axes[0]}_parallelism")
    _fail(first, problem)


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
    problem = vocab.logical_rule_problem(rule)
    if problem:
      _fail("logical_axis_rules", problem)
    name, target = rule
    if target is None:
      continue
    for mesh_axis in [target] if isinstance(target, str) else target:
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


RECALL_SPECIAL_TOKENS = 2  # recall task ids 0 (padding) and 1 (separator); keys, values follow


def recall_example_length(pairs: int, queries: int) -> int:
  """Tokens of one recall example: k1 v1 ... kn vn SEP q1 a1 ... qm am (m <= n)."""
  return 2 * pairs + 1 + 2 * min(pairs, queries)


def _validate_training(cfg: Mapping[str, Any]) -> None:
  """The decoder model, optimizer, checkpoint and recall-task keys."""
  for key in ("vocab_size", "num_decoder_layers", "mlp_dim", "steps", "global_batch_size",
              "log_period", "eval_period", "task_num_keys", "task_num_values", "task_min_pairs",
              "task_max_pairs", "task_num_queries", "task_eval_rows"):
    if cfg[key] < 1:
      _fail(key, f"must be an integer >= 1, got {cfg[key]}")
  for key in ("seed", "warmup_steps", "checkpoint_period", "max_checkpoints_to_keep",
              "weight_decay", "grad_clip_norm"):
    _at_least(cfg, key, 0)
  _positive(cfg, "learning_rate")
  _positive(cfg, "adam_eps")
  for key in ("adam_b1", "adam_b2"):
    if not 0 <= cfg[key] < 1:
      _fail(key, f"must be in [0, 1), got {cfg[key]}")
  if cfg["warmup_steps"] > cfg["steps"]:
    _fail("warmup_steps", f"must be <= steps={cfg['steps']}, got {cfg['warmup_steps']}")
  if not 0 <= cfg["stop_at_accuracy"] <= 1:
    _fail("stop_at_accuracy", f"must be in [0, 1] (0 = run every step), got {cfg['stop_at_accuracy']}")
  if cfg["checkpoint_period"] and not (cfg["checkpoint_dir"] or cfg["output_dir"]):
    _fail("checkpoint_dir", "checkpoint_period > 0 needs a checkpoint_dir (or an output_dir to "
          "hold <output_dir>/checkpoints)")
  if cfg["task_min_pairs"] > cfg["task_max_pairs"]:
    _fail("task_min_pairs", f"must be <= task_max_pairs={cfg['task_max_pairs']}, "
          f"got {cfg['task_min_pairs']}")
  if cfg["task_max_pairs"] > cfg["task_num_keys"]:
    _fail("task_max_pairs", f"must be <= task_num_keys={cfg['task_num_keys']} (the keys of an "
          f"example are distinct), got {cfg['task_max_pairs']}")
  needed = RECALL_SPECIAL_TOKENS + cfg["task_num_keys"] + cfg["task_num_values"]
  if cfg["vocab_size"] < needed:
    _fail("vocab_size", f"must be >= {needed} for the recall task (2 special tokens + "
          f"task_num_keys={cfg['task_num_keys']} + task_num_values={cfg['task_num_values']}), "
          f"got {cfg['vocab_size']}")
  longest = recall_example_length(cfg["task_max_pairs"], cfg["task_num_queries"])
  if longest > cfg["max_target_length"]:
    _fail("task_max_pairs", f"the longest recall example ({cfg['task_max_pairs']} pairs, "
          f"{cfg['task_num_queries']} queries) has {longest} tokens, more than a row of "
          f"max_target_length={cfg['max_target_length']}")


def validate(cfg: Mapping[str, Any], num_devices: int | None = None) -> None:
  """Check the cross-key rules of a typed, complete config dict; raise ConfigError on the first failure.

  Separate from parsing so tests and tools can validate a hand-edited dict
  (e.g. ``{**cfg.to_dict(), "num_kv_heads": 3}``). ``num_devices`` defaults
  to ``jax.device_count()``.
  """
  check_values(cfg.items())
  _validate_enumerated(cfg)
  _validate_shape(cfg)
  _validate_attention(cfg)
  _validate_linear(cfg)
  _validate_rope(cfg)
  _validate_lengths(cfg)
  _validate_mesh(cfg, num_devices)
  _validate_rules(cfg)
  _validate_axis_names(cfg)
  _validate_training(cfg)
