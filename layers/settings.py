"""Typed, frozen settings of the Attention layer.

`AttentionSettings` is the keyword constructor underneath
`Attention(config, ...)`: people embedding the layer in their own model build
it from keyword arguments; YAML users get it from `AttentionSettings.from_config`.
The config is read here, once. The flat fields (the config keys' names) are the
record (==, hash, dataclasses.replace); `__post_init__` checks them and groups
them into typed specs (layers/specs.py, layers/cache_specs.py): `shape`,
`projection`, `kernel`, `sharding`, `lengths`, `cache`, beside `mask`, `rope`
and `linear`, which the layer and the kernels read.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from meshattn.configs import vocabulary as vocab
from meshattn.configs.validation import POSITIVE_OR_UNSET, check_values
from meshattn.configs.vocabulary import MODEL_MODES, QK_NORM_TYPES  # noqa: F401  (re-exported)
from meshattn.kvcache.cache import CACHE_AXIS_NAMES
from meshattn.kvcache.quant import KVQuant
from meshattn.layers.cache_specs import CACHE_KEYWORDS, CacheSpec, cache_keywords, cache_spec
from meshattn.layers.linear.spec import LinearSpec, check_linear_layer
from meshattn.layers.masks import MaskSpec
from meshattn.layers.projections import Initializer, default_bias_init, default_kernel_init
from meshattn.layers.quantization import check_quantization
from meshattn.layers.rope import RopeSpec
from meshattn.layers.specs import (  # noqa: F401  (ActivationAxes, the rules: re-exported)
    DEFAULT_LOGICAL_AXIS_RULES, ActivationAxes, KernelSpec, LengthSpec, ModeAxes, ProjectionSpec,
    ShapeSpec, ShardingSpec, TemperatureTuning)

DTYPES: Mapping[str, jnp.dtype] = {name: getattr(jnp, name) for name in vocab.DTYPE_NAMES}
PRECISIONS: Mapping[str, jax.lax.Precision | None] = {
    name: None if name == "default" else jax.lax.Precision[name.upper()]
    for name in vocab.MATMUL_PRECISIONS}

def _check_dtype(name: str, value: Any) -> Any:
  """A dtype keyword: a dtype object (kept as given), or one of vocabulary.DTYPE_NAMES (read
  as the jnp dtype, so keywords and a config give equal records); ValueError otherwise."""
  allowed = f"a jnp dtype (jnp.bfloat16) or one of {list(vocab.DTYPE_NAMES)}"
  if isinstance(value, str):
    if value not in DTYPES:
      raise ValueError(f"{name}={value!r}: allowed {allowed}")
    return DTYPES[value]
  try:
    jnp.dtype(value)
  except TypeError:
    raise ValueError(f"{name}={value!r}: allowed {allowed}") from None
  return value


_CONFIG_PREFIX = {"train": "", "prefill": "prefill_", "autoregressive": "decode_"}


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
  """Every knob of the layer. Sizes follow Flax: qkv_features = heads * head_dim.

  Built from these fields (not fields themselves, so ==, hash and replace ignore them):
  `shape`, `projection`, `kernel`, `sharding`, `lengths` (layers/specs.py) and `cache`
  (layers/cache_specs.py). `cache=` takes a ContiguousCache / PagedCache in place of the
  flat cache keywords (cache_specs.CACHE_KEYWORDS)."""

  emb_dim: int  # D, features of inputs_q
  num_query_heads: int  # N
  num_kv_heads: int | None = None  # K; None = num_query_heads (MHA)
  head_dim: int | None = None  # H; None = qkv_features // N, or emb_dim // N
  qkv_features: int | None = None  # Flax-style alternative to head_dim
  out_features: int | None = None  # None = emb_dim
  kv_emb_dim: int | None = None  # features of inputs_kv (cross-attention); None = emb_dim
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  precision: jax.lax.Precision | None = None
  attention: str = "autoselected"  # train-mode kernel (registry.TRAIN_KERNELS)
  decode_attention: str = "autoselected"  # autoregressive kernel (registry.DECODE_KERNELS)
  pallas_interpret: bool = False  # run Pallas TPU kernels in interpret mode (CPU tests)
  mask: MaskSpec = MaskSpec()
  # > 0, or unset (None or 0, as in a config): no cap / softmax scale head_dim**-0.5.
  attn_logits_soft_cap: float | None = None
  query_pre_attn_scalar: float | None = None
  attention_sink: bool = False
  float32_qk_product: bool = False
  float32_logits: bool = False
  dropout_rate: float = 0.0
  broadcast_dropout: bool = True
  fused_qkv: bool = False
  share_kv_projections: bool = False
  use_bias: bool = False
  use_qk_norm: bool = False
  qk_norm_type: str = "rms"  # rms (scale), l2 (no parameters, Llama 4), layernorm (Flax normalize_qk)
  normalization_layer_epsilon: float = 1e-6
  # Llama 4: queries of a layer without RoPE scaled by
  # log(floor((position + 1) / floor_scale) + 1) * scale + 1.
  temperature_tuning: bool = False
  temperature_tuning_scale: float = 0.1
  temperature_tuning_floor_scale: float = 8192.0
  # Projection matmuls: `quantization` ("" or "int8", layers/quantization.py),
  # or Flax-style hooks with jax.lax.dot_general's signature for the q/k/v
  # (or fused qkv) projections and the output projection.
  quantization: str = ""
  qkv_dot_general: Callable[..., jax.Array] | None = None
  out_dot_general: Callable[..., jax.Array] | None = None
  rope: RopeSpec = RopeSpec()
  # Position streams inputs_positions carries ([n, batch..., T] when n > 1):
  # None = len(rope.mrope_section) or 1. A config sets it on every layer of
  # an MRoPE model, so its NoPE layers take the same positions.
  position_streams: int | None = None
  max_target_length: int = 2048
  # None: min(1024, max_target_length), so a short max_target_length alone is enough.
  max_prefill_predict_length: int | None = None
  # KV cache (prefill / autoregressive modes).
  kv_quant: KVQuant | None = None  # None = full-precision cache
  prefill_cache_axis_order: tuple[int, ...] = (0, 1, 2, 3)
  ar_cache_axis_order: tuple[int, ...] = (0, 1, 2, 3)
  use_chunked_prefill: bool = False
  prefill_chunk_size: int = 256
  # None: a ring on a contiguous cache (a paged one keeps every token; True with it raises).
  sliding_window_ring_buffer: bool | None = None
  cache_axis_names: tuple[str, ...] = CACHE_AXIS_NAMES
  paged_kv_cache: bool = False
  num_pages: int = 64
  tokens_per_page: int = 16
  logical_axis_rules: tuple[tuple[str, Any], ...] = DEFAULT_LOGICAL_AXIS_RULES
  axes: ModeAxes = ModeAxes()
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  # A Flax-signature attention function (query, key, value, bias=, mask=, ...).
  attention_fn: Callable[..., jax.Array] | None = None
  # FlexAttention-style hooks; prebuilt ones in meshattn.layers.score_mods.
  score_mod: Callable[..., jax.Array] | None = None
  mask_mod: Callable[..., jax.Array] | None = None
  # A linear-attention layer when set (layers/linear; config: attention_type linear).
  linear: LinearSpec | None = None
  # Gated attention: none | elementwise | headwise (layers/output_gate.py).
  attention_output_gate: str = "none"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    # The config's one-value rules (finite floats, sizes >= 1, > 0 or unset), by field name.
    check_values((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
    for name in ("dtype", "weight_dtype"):
      set_(name, _check_dtype(name, getattr(self, name)))
    for rule in self.logical_axis_rules:
      problem = vocab.logical_rule_problem(rule)
      if problem:
        raise ValueError(f"logical_axis_rules: {problem}")
    for name in POSITIVE_OR_UNSET:
      if getattr(self, name) == 0:
        set_(name, None)  # one spelling of "unset" for the layer and the kernels
    n = self.num_query_heads
    if self.num_kv_heads is None:
      set_("num_kv_heads", n)
    if n % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_query_heads={n}")
    if self.head_dim is None:
      features = self.qkv_features or self.emb_dim
      if features % n:
        raise ValueError(f"qkv_features={features} must be divisible by num_query_heads={n}")
      set_("head_dim", features // n)
    elif self.qkv_features is not None and self.qkv_features != n * self.head_dim:
      raise ValueError(f"qkv_features={self.qkv_features} != num_query_heads * head_dim = {n * self.head_dim}")
    if self.rope.enabled:
      self.rope.check(self.head_dim)  # odd rotated width, MRoPE sections that do not cover it
    sections = len(self.rope.mrope_section)
    if self.position_streams is not None and sections and self.position_streams != sections:
      raise ValueError(f"position_streams={self.position_streams}: must equal the {sections} "
                       "mrope_section entries")
    if self.qk_norm_type not in QK_NORM_TYPES:
      raise ValueError(f"qk_norm_type={self.qk_norm_type!r}: allowed {list(QK_NORM_TYPES)}")
    if self.temperature_tuning and self.rope.enabled:
      raise ValueError("temperature_tuning scales the queries of layers without RoPE (Llama 4's "
                       "NoPE layers): this layer has rope_type="
                       f"{self.rope.rope_type!r}; use rope_type 'none' (in a config: "
                       "nope_layer_interval)")
    for name in vocab.POSITIVE_FLOATS:
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
    if self.max_prefill_predict_length is None:
      set_("max_prefill_predict_length", vocab.default_prefill_length(self.max_target_length))
    problem = vocab.prefill_length_problem(self.max_prefill_predict_length,
                                           self.max_target_length)
    if problem:
      raise ValueError(f"max_prefill_predict_length={self.max_prefill_predict_length}: {problem}")
    check_quantization(self.quantization)
    if self.quantization and self.precision is not None:
      raise ValueError(f"quantization={self.quantization!r} runs integer matmuls and takes no "
                       f"precision (got {self.precision}): leave precision None")
    if self.quantization and (self.qkv_dot_general or self.out_dot_general):
      raise ValueError(f"quantization={self.quantization!r} sets the projections' dot_general; "
                       "give it or qkv_dot_general / out_dot_general, not both")
    if self.fused_qkv and self.share_kv_projections:
      raise ValueError("fused_qkv and share_kv_projections cannot both be true")
    if self.fused_qkv and self.kv_emb_dim not in (None, self.emb_dim):
      raise ValueError("fused_qkv needs inputs_kv with emb_dim features (self-attention)")
    if not vocab.dropout_in_range(self.dropout_rate):
      raise ValueError(f"dropout_rate={self.dropout_rate}: allowed {vocab.DROPOUT_RANGE}")
    # The cache's tagged kind; raises naming the keys a paged cache has no use for.
    set_("cache", self.cache_for())
    # The ring's key in one spelling, so a config and its keywords give equal records: None
    # (a ring where the cache is contiguous; True said the same) or False (no ring). False
    # is kept beside pages too: it still lays out a contiguous cache that init_cache(
    # paged=False) builds from a paged layer.
    if self.sliding_window_ring_buffer is True:
      set_("sliding_window_ring_buffer", None)
    if self.attention_output_gate not in vocab.OUTPUT_GATES:
      raise ValueError(f"attention_output_gate={self.attention_output_gate!r}: allowed "
                       f"{list(vocab.OUTPUT_GATES)}")
    if self.linear is not None:
      check_linear_layer(self.linear, num_kv_heads=self.num_kv_heads,
                         mask_type=self.mask.attention_type, attention_sink=self.attention_sink,
                         soft_cap=self.attn_logits_soft_cap, score_mod=self.score_mod,
                         mask_mod=self.mask_mod, attention_fn=self.attention_fn,
                         dropout_rate=self.dropout_rate)
    self._group()

  def _group(self) -> None:
    """Build the typed groups from the checked flat fields (resolved values only)."""
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("shape", ShapeSpec(
        emb_dim=self.emb_dim, num_query_heads=self.num_query_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        out_features=self.out_features or self.emb_dim, kv_emb_dim=self.kv_emb_dim or self.emb_dim,
        position_streams=self.position_streams or len(self.rope.mrope_section) or 1))
    tuning = (TemperatureTuning(self.temperature_tuning_scale, self.temperature_tuning_floor_scale)
              if self.temperature_tuning else None)
    set_("projection", ProjectionSpec(
        fused_qkv=self.fused_qkv, share_kv_projections=self.share_kv_projections,
        use_bias=self.use_bias, qk_norm=self.qk_norm_type if self.use_qk_norm else None,
        normalization_layer_epsilon=self.normalization_layer_epsilon,
        temperature_tuning=tuning, quantization=self.quantization,
        qkv_dot_general=self.qkv_dot_general, out_dot_general=self.out_dot_general,
        kernel_init=self.kernel_init, bias_init=self.bias_init,
        attention_output_gate=self.attention_output_gate))
    set_("kernel", KernelSpec(
        attention=self.attention, decode_attention=self.decode_attention,
        pallas_interpret=self.pallas_interpret,
        # Applied at run time (never folded into initialisers).
        scale=(self.query_pre_attn_scalar or self.head_dim) ** -0.5,
        attn_logits_soft_cap=self.attn_logits_soft_cap, attention_sink=self.attention_sink,
        float32_qk_product=self.float32_qk_product, float32_logits=self.float32_logits,
        dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
        attention_fn=self.attention_fn, score_mod=self.score_mod, mask_mod=self.mask_mod))
    set_("sharding", ShardingSpec(self.logical_axis_rules, self.axes))
    set_("lengths", LengthSpec(
        self.max_target_length, self.max_prefill_predict_length,
        self.prefill_chunk_size if self.use_chunked_prefill else None))

  def cache_for(self, *, paged: bool | None = None, ring_buffer: bool | None = None) -> CacheSpec:
    """`settings.cache`: the cache kind the flat keys describe, or the kind
    `init_cache(paged=..., ring_buffer=...)` asks for instead (None: the keys' choice)."""
    return cache_spec({name: getattr(self, name) for name in CACHE_KEYWORDS},
                      linear=self.linear is not None, paged=paged, ring_buffer=ring_buffer)

  @property
  def num_position_streams(self) -> int:
    """n when inputs_positions are [n, batch..., T] streams (MRoPE), 1 for [batch..., T]."""
    return self.shape.position_streams

  @property
  def group_size(self) -> int:
    return self.shape.group_size

  @property
  def scale(self) -> float:
    """Softmax scale, applied at run time (never folded into initialisers)."""
    return self.kernel.scale

  @classmethod
  def from_config(cls, config, *, layer_idx: int = 0, **overrides) -> "AttentionSettings":
    """Read the layer's settings from a loaded config (configs.load_config).

    `layer_idx` picks this layer's entry of `attention_layer_pattern`, and
    whether it is a NoPE layer (`nope_layer_interval`).
    """
    c = config
    pattern = tuple(c.attention_layer_pattern)
    attention_type = pattern[layer_idx % len(pattern)] if pattern else c.attention_type
    linear = None
    if attention_type == "linear":  # causal, with no mask of its own
      attention_type = "global"
      linear = LinearSpec(chunk_size=c.linear_attention_chunk_size,
                          feature_map=c.linear_feature_map,
                          decay=tuple(c.linear_decay_per_head) or c.linear_decay,
                          normalize=c.linear_normalize)
    mask = MaskSpec(
        attention_type,
        window=c.sliding_window_size if attention_type == "local_sliding" else None,
        chunk=c.chunk_attn_window_size if attention_type == "chunk" else None)
    rope = RopeSpec(
        rope_type=c.rope_type, min_timescale=float(c.rope_min_timescale),
        max_timescale=float(c.rope_max_timescale), partial_rotary_factor=c.partial_rotary_factor,
        factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
        high_freq_factor=c.rope_high_freq_factor,
        original_max_position_embeddings=c.original_max_position_embeddings,
        beta_fast=c.beta_fast, beta_slow=c.beta_slow, truncate=c.rope_truncate,
        attention_factor=c.rope_attention_factor,
        mrope_section=tuple(c.mrope_section) if c.use_mrope else ())
    # Llama 4's NoPE layers: every nope_layer_interval-th layer has no RoPE and
    # no QK norm, and is the only kind temperature tuning applies to.
    nope = c.nope_layer_interval > 0 and (layer_idx + 1) % c.nope_layer_interval == 0
    if nope:
      rope = dataclasses.replace(rope, rope_type="none", mrope_section=())
    axes = ModeAxes(**{
        mode: ActivationAxes(*(tuple(c[f"{prefix}{part}_axis_names"])
                               for part in ("input", "query", "key", "value", "out")))
        for mode, prefix in _CONFIG_PREFIX.items()})
    # Keys read into typed values (or changed by the layer's place in the pattern) ...
    read = dict(
        dtype=DTYPES[c.dtype], weight_dtype=DTYPES[c.weight_dtype],
        precision=PRECISIONS[c.matmul_precision], mask=mask, rope=rope,
        use_qk_norm=c.use_qk_norm and not nope,
        temperature_tuning=c.temperature_tuning and not rope.enabled,
        position_streams=len(c.mrope_section) if c.use_mrope else None,
        kv_quant=KVQuant(c.kv_quant_dtype, c.kv_quant_axis) if c.quantize_kvcache else None,
        logical_axis_rules=normalize_rules(c.logical_axis_rules), axes=axes, linear=linear)
    # ... and every other field named after a config key takes the key's value as it is (a
    # new key of that kind is its base.yml line and its field here, nothing in between).
    kwargs = {**{f.name: c[f.name] for f in dataclasses.fields(cls)
                 if f.name in c and f.name not in read}, **read}
    return cls.with_overrides(kwargs, overrides)

  @classmethod
  def with_overrides(cls, base: Mapping[str, Any], overrides: Mapping[str, Any]) -> "AttentionSettings":
    """Build from `base` kwargs plus keyword overrides, naming any unknown keyword.

    A `cache=` spec replaces the base's flat cache keys (a config's among them): the kind
    and its knobs. KV quantization and the cache's axis names belong to every kind, so a
    base that sets them and a spec left at their defaults is an error naming the config
    key, never a silent drop (`_check_cache_spec_keeps`)."""
    known = {f.name for f in dataclasses.fields(cls)} | {"cache"}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise TypeError(f"Attention got unknown keyword(s) {unknown}; allowed: {sorted(known)}")
    if overrides.get("cache") is not None:
      _check_cache_spec_keeps(base, overrides["cache"])
      base = {name: value for name, value in base.items() if name not in CACHE_KEYWORDS}
    return cls(**{**base, **overrides})


# Cache keywords every KV kind has -> the config keys that set them.
_SHARED_CACHE_KEYS = {"kv_quant": "quantize_kvcache (kv_quant_dtype, kv_quant_axis)",
                      "cache_axis_names": "cache_axis_names"}


def _check_cache_spec_keeps(base: Mapping[str, Any], spec: Any) -> None:
  """Raise when `base` (a config) sets a knob both kinds share that `spec` leaves at its
  default: the user asked for it once and `cache=` would drop it unseen. A spec that sets
  its own value wins. Checked before any settings exist."""
  for name, config_key in _SHARED_CACHE_KEYS.items():
    default = _FIELD_DEFAULTS[name]
    ours = base.get(name, default)
    theirs = getattr(spec, name, default)
    if ours != default and theirs == default:
      raise ValueError(f"cache={spec!r} replaces the config's cache keys, and the config sets "
                       f"{config_key} ({name}={ours!r}) which the spec leaves at its default "
                       f"{default!r}: set {name}={ours!r} in the spec (or unset {config_key} "
                       "in the config)")


def _accept_cache_spec(init: Callable[..., None]) -> Callable[..., None]:
  """Let `AttentionSettings(cache=PagedCache(...))` stand for the flat cache keywords.

  The spec is unfolded into them before the dataclass's own __init__, so the flat
  fields stay the one record (==, hash, and dataclasses.replace, which passes every
  field again) and `settings.cache` is rebuilt from them; giving both is an error."""

  @functools.wraps(init)
  def __init__(self, *args, cache: CacheSpec | None = None, **kwargs):
    if cache is not None:
      given = sorted(set(kwargs) & set(CACHE_KEYWORDS))
      if given:
        raise ValueError(f"cache={cache!r} sets the cache keywords; give it or {given}, not both")
      kwargs.update(cache_keywords(cache))
    init(self, *args, **kwargs)

  signature = inspect.signature(init)
  __init__.__signature__ = signature.replace(parameters=[
      *signature.parameters.values(),
      inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None)])
  return __init__


AttentionSettings.__init__ = _accept_cache_spec(AttentionSettings.__init__)
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AttentionSettings)
                   if f.default is not dataclasses.MISSING}


def normalize_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Rules as hashable (name, axes) pairs; axes: str, tuple of str, or None."""
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)
