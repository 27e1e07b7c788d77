"""The vocabulary of meshattn: every allowed value set and each one-value rule, written once.

JAX-free (plain Python), so the config loader can read it without starting
JAX. The config path (configs/validation.py), the keyword path
(layers/settings.py, masks.py, quantization.py, kvcache/quant.py) and the
kernel registry all import from here; each keeps its own error wording
(a config error names the key, a keyword error the argument), but the value
sets and the predicates are these.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# ---- enumerated values -----------------------------------------------------------

# Kernels: `attention` picks the train-mode kernel, `decode_attention` the autoregressive one.
TRAIN_KERNELS: tuple[str, ...] = ("dot_product", "blockwise", "flash", "ring", "autoselected")
DECODE_KERNELS: tuple[str, ...] = ("dot_product", "ragged", "paged", "autoselected")
# Where a kernel runs (jax.default_backend(), anything else counts as cpu).
PLATFORMS: tuple[str, ...] = ("cpu", "gpu", "tpu")
# What a call may need from a kernel (the registry's feature columns).
FEATURES: tuple[str, ...] = (
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "user_mask",
    "user_bias", "score_mod", "mask_mod", "dropout", "weights", "quantized_kv", "paged_kv", "backward",
    "float32")
# The registry feature each structural mask kind needs.
MASK_FEATURE: Mapping[str, str] = {
    "global": "causal", "local_sliding": "window", "chunk": "chunk", "full": "full"}
ATTENTION_TYPES: tuple[str, ...] = tuple(MASK_FEATURE)  # global, local_sliding, chunk, full
# A layer's kind in `attention_type` / `attention_layer_pattern`: a softmax mask kind, or
# linear attention (layers/linear), which has no mask of its own (it is causal).
LAYER_TYPES: tuple[str, ...] = ATTENTION_TYPES + ("linear",)
# Linear attention's feature maps; the positive ones keep the normalizer's denominator > 0.
LINEAR_FEATURE_MAPS: tuple[str, ...] = ("elu_plus_one", "relu", "silu", "identity")
POSITIVE_FEATURE_MAPS: tuple[str, ...] = ("elu_plus_one", "relu")
# Gated attention's output gate (layers/output_gate.py): per head and channel, per head, or none.
OUTPUT_GATES: tuple[str, ...] = ("none", "elementwise", "headwise")
ROPE_TYPES: tuple[str, ...] = ("default", "llama3.1", "yarn", "none")
MODEL_MODES: tuple[str, ...] = ("train", "prefill", "autoregressive")
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS: tuple[str, ...] = ("default", "high", "highest")
QUANTIZATION_MODES: tuple[str, ...] = ("", "int8")  # projection matmuls ("" = none)
QK_NORM_TYPES: tuple[str, ...] = ("rms", "l2", "layernorm")
# KV cache quantization: storage dtype -> largest magnitude it holds (symmetric).
KV_QUANT_QMAX: Mapping[str, int] = {"int8": 127, "int4": 7}
KV_QUANT_DTYPES: tuple[str, ...] = tuple(KV_QUANT_QMAX)
KV_QUANT_AXES: tuple[str, ...] = ("dkv", "heads_and_dkv")
# The logical dims of a cache entry, in the order a cache axis permutation refers to.
CACHE_DIMS: tuple[str, ...] = ("batch", "sequence", "kv heads", "head_dim")
# The decoder model and the trainer (layers/decoder.py, layers/mlp.py, scripts/train.py).
MLP_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu")
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "minimal", "save_qkv_proj", "save_out_proj",
                                   "save_dot_except_mlp")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")

# Each enumerated config key and its allowed values: configs/validation.py checks every
# entry ("<key>: 'x' is not one of [...]"), so a new enumerated key is one line here. The
# keyword path checks its own arguments against the same sets, in its own wording.
# `attention` is not listed: its kernels are read when a config is validated
# (validation.KNOWN_KERNELS, which a kernel registry may extend).
KEY_VALUES: Mapping[str, tuple[str, ...]] = {
    "dtype": DTYPE_NAMES,
    "weight_dtype": DTYPE_NAMES,
    "matmul_precision": MATMUL_PRECISIONS,
    "quantization": QUANTIZATION_MODES,
    "qk_norm_type": QK_NORM_TYPES,
    "decode_attention": DECODE_KERNELS,
    "attention_type": LAYER_TYPES,
    "attention_output_gate": OUTPUT_GATES,
    "linear_feature_map": LINEAR_FEATURE_MAPS,
    "rope_type": ROPE_TYPES,
    "kv_quant_dtype": KV_QUANT_DTYPES,
    "kv_quant_axis": KV_QUANT_AXES,
    "mlp_activation": MLP_ACTIVATIONS,
    "remat_policy": REMAT_POLICIES,
    "lr_schedule": LR_SCHEDULES,
}

# Keys whose base.yml default is null (left to the other keys), and the type a set value has.
NULLABLE_KEYS: Mapping[str, type] = {
    # null: a ring on a contiguous cache's sliding-window layers; a paged cache keeps every
    # token, so true with paged_kv_cache is refused (layers/cache_specs.py).
    "sliding_window_ring_buffer": bool,
    # null: default_prefill_length(max_target_length), resolved by the loader (NULL_RESOLVED).
    "max_prefill_predict_length": int,
}

# The longest prompt one prefill call takes when none is set, capped by the cache length: a
# config and the keywords (AttentionSettings) both take it, so a short max_target_length
# alone builds either way.
DEFAULT_PREFILL_LENGTH = 1024


def default_prefill_length(max_target_length: int) -> int:
  return min(DEFAULT_PREFILL_LENGTH, max_target_length)


# Nullable keys whose null the loader replaces by a value derived from other keys (the loaded
# config then holds the value): key -> function of the typed config.
NULL_RESOLVED: Mapping[str, Callable[[Mapping[str, Any]], Any]] = {
    "max_prefill_predict_length": lambda cfg: default_prefill_length(cfg["max_target_length"]),
}

# ---- one-value rules -------------------------------------------------------------
# Each returns what is wrong (a phrase without the key's name) or None.

# Mask kinds that need a size, and the config key of that size.
MASK_SIZE_KEYS: Mapping[str, str] = {
    "local_sliding": "sliding_window_size", "chunk": "chunk_attn_window_size"}
DROPOUT_RANGE = "[0, 1)"


def mask_size_problem(attention_type: str, size: int | None) -> str | None:
  """A sliding window or a chunk needs a size > 0 (the other kinds take none)."""
  if attention_type not in MASK_SIZE_KEYS:
    return None
  # A float window would round inside the mask (2.5 saw 3 keys) and break the
  # cache shapes built from it; a bool is not a size.
  if isinstance(size, bool) or not isinstance(size, numbers.Integral):
    return f"must be an integer > 0 when attention_type uses {attention_type!r}, got {size!r}"
  if size <= 0:
    return f"must be > 0 when attention_type uses {attention_type!r}, got {size}"
  return None


def linear_decay_problem(gammas) -> str | None:
  """Linear attention's decay: each gamma in (0, 1] (1 = plain linear attention)."""
  bad = [g for g in gammas if not (math.isfinite(g) and 0 < g <= 1)]
  return f"every gamma must be in (0, 1], got {list(gammas)}" if bad else None


def linear_heads_problem(gammas, num_kv_heads: int) -> str | None:
  """A per-head decay has one gamma per kv head (the state is per kv head)."""
  if len(gammas) > 1 and len(gammas) != num_kv_heads:
    return (f"has {len(gammas)} values: give one gamma per kv head (num_kv_heads="
            f"{num_kv_heads}), or one for every head")
  return None


def linear_normalize_problem(normalize: bool, feature_map: str) -> str | None:
  """The normalizer divides by sum phi(q) . phi(k): only a positive map keeps it > 0."""
  if normalize and feature_map not in POSITIVE_FEATURE_MAPS:
    return (f"needs a positive linear_feature_map {list(POSITIVE_FEATURE_MAPS)} (the denominator "
            f"must stay > 0), got {feature_map!r}; set linear_normalize false")
  return None


# Floats that are > 0 whenever given (a 0 or negative one gives NaN or a division by 0).
# Checked by name: validation._validate_shape (the keys), AttentionSettings (the keywords).
POSITIVE_FLOATS: tuple[str, ...] = ("normalization_layer_epsilon", "temperature_tuning_floor_scale")


def prefill_length_problem(prefill: int, target: int) -> str | None:
  """A prompt is prefilled into the cache of max_target_length tokens, so it fits there."""
  if not 1 <= prefill <= target:
    return f"must be in [1, max_target_length={target}], got {prefill}"
  return None


# RoPE's numeric fields (RopeSpec's names) -> their config keys.
ROPE_CONFIG_KEYS: Mapping[str, str] = {
    "min_timescale": "rope_min_timescale", "max_timescale": "rope_max_timescale",
    "factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor", "beta_fast": "beta_fast",
    "beta_slow": "beta_slow", "attention_factor": "rope_attention_factor"}


def rope_problem(rope_type: str, values: Mapping[str, float],
                 names: Mapping[str, str] | None = None) -> tuple[str, str] | None:
  """RoPE's timescales and scaling factors: None, or (field, what is wrong) for the first
  field that breaks a rule. `values` is keyed by RopeSpec's field names; `names` gives the
  wording of the other fields a phrase mentions (the config keys; default the field names)."""
  v = values
  name = lambda field: (names or {}).get(field, field)
  if not v["min_timescale"] > 0:
    return "min_timescale", f"must be > 0, got {v['min_timescale']}"
  if not v["max_timescale"] > v["min_timescale"]:
    return "max_timescale", (f"must be > {name('min_timescale')}={v['min_timescale']}, "
                             f"got {v['max_timescale']}")
  if rope_type in ("llama3.1", "yarn") and not v["factor"] >= 1:
    return "factor", f"must be >= 1 for {rope_type}, got {v['factor']}"
  if rope_type == "llama3.1":
    if not v["low_freq_factor"] > 0:
      return "low_freq_factor", f"must be > 0 for llama3.1, got {v['low_freq_factor']}"
    # Equal factors (Llama 4) leave no blended band between the two cut-offs.
    if not v["high_freq_factor"] >= v["low_freq_factor"]:
      return "high_freq_factor", (f"must be >= {name('low_freq_factor')}={v['low_freq_factor']} "
                                  f"for llama3.1, got {v['high_freq_factor']}")
  if rope_type == "yarn":
    # The ramp's ends are log(original_max_position_embeddings / (2 pi beta)): beta > 0.
    if not v["beta_slow"] > 0:
      return "beta_slow", f"must be > 0 for yarn (a number of rotations), got {v['beta_slow']}"
    if not v["beta_fast"] > v["beta_slow"]:
      return "beta_fast", (f"must be > {name('beta_slow')}={v['beta_slow']} for yarn, "
                           f"got {v['beta_fast']}")
  if not v["attention_factor"] >= 0:
    return "attention_factor", f"must be >= 0 (0 = 0.1*ln(factor)+1), got {v['attention_factor']}"
  return None


def dropout_in_range(rate: float) -> bool:
  """Dropout keeps each weight with probability 1 - rate: rate in DROPOUT_RANGE."""
  return 0.0 <= rate < 1.0


def is_axis_permutation(order: Sequence[int]) -> bool:
  """A cache axis order names each of the CACHE_DIMS once, as ints (not bools, floats or
  strings: 1.0 or '3' is a typo, never an axis)."""
  if not all(isinstance(a, int) and not isinstance(a, bool) for a in order):
    return False
  return sorted(order) == list(range(len(CACHE_DIMS)))


DEFAULT_CACHE_AXIS_ORDER: tuple[int, ...] = tuple(range(len(CACHE_DIMS)))


def paged_axis_order_problem(order: Sequence[int]) -> str | None:
  """`ar_cache_axis_order` lays out the contiguous decode cache; a paged decode cache's
  pool has one layout, so with paged_kv_cache it stays the identity (never ignored
  silently). `prefill_cache_axis_order` is free: a prefill cache is contiguous."""
  if tuple(order) != DEFAULT_CACHE_AXIS_ORDER:
    return ("lays out the contiguous decode cache only; a paged cache keeps its pool [pages, "
            "tokens, kv heads, head_dim] in one layout: leave it [0, 1, 2, 3] "
            "(prefill_cache_axis_order still lays out a contiguous prefill cache)")
  return None


def paged_ring_problem(paged: bool, ring: bool | None) -> str | None:
  """The ring buffer is the contiguous cache's; a page pool keeps every token. Unset (None)
  means "a ring where the cache is contiguous", so only an explicit true contradicts pages."""
  if paged and ring:
    return ("is the contiguous cache's ring; a paged cache keeps every token in its pages: "
            "leave it unset (null / None) or false with paged_kv_cache")
  return None


def logical_rule_problem(rule) -> str | None:
  """A logical axis rule is [logical_name, mesh_axis | [mesh_axes] | null]."""
  if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
    return f"rule {rule!r} must be [logical_name, mesh_axis | [mesh_axes] | null]"
  target = rule[1]
  targets = [] if target is None else [target] if isinstance(target, str) else target
  if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
    return f"rule {list(rule)!r}: axes must be a str, a list of str or null"
  return None


def parallelism_problem(value: int) -> str | None:
  """An ici_* / dcn_* degree is >= 1, or -1 to fill the remaining devices."""
  if value == -1 or value >= 1:
    return None
  return f"must be -1 (fill) or >= 1, got {value}"


def mesh_product_problem(degrees: Mapping[str, int], devices: int) -> str | None:
  """The fixed degrees times the filled ones (-1, at most one per prefix, checked by the
  caller) must make the device count: None, or what is wrong (naming the degrees)."""
  fixed = {k: v for k, v in degrees.items() if v != -1}
  fills = [k for k, v in degrees.items() if v == -1]
  product = math.prod(fixed.values())
  shown = " * ".join(f"{k}={v}" for k, v in fixed.items() if v != 1) or "all 1"
  if not fills and product != devices:
    return (f"product of ici_*/dcn_* parallelism ({shown}) = {product} must equal the device "
            f"count {devices}; set one key to -1 to fill the rest")
  if fills and devices % product:
    return (f"-1 fill impossible: device count {devices} is not divisible by the product of the "
            f"other ici_*/dcn_* parallelism ({shown}) = {product}")
  return None


def token_range_problem(low: int, high: int, vocab_size: int | None) -> str | None:
  """Token ids spanning [low, high] against [0, vocab_size) (None: >= 0 only): what is
  allowed and what was given, or None. The decoder (eager calls) and the serving engine
  (every request, before its compiled steps) both ask."""
  if low >= 0 and (vocab_size is None or high < vocab_size):
    return None
  allowed = ">= 0" if vocab_size is None else f"in [0, vocab_size={vocab_size})"
  return f"ids {allowed}, got values in [{low}, {high}]"
