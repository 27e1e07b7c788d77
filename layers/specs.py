"""The layer's settings in small typed groups, built once by `AttentionSettings`.

`AttentionSettings` takes flat keywords with the config keys' names; its
`__post_init__` groups them into these frozen specs (`settings.shape`,
`settings.projection`, `settings.kernel`, `settings.sharding`,
`settings.lengths`; the mask, RoPE, linear-attention and cache specs beside
them), so readers take the few values they need from one group. Each spec
holds resolved values (kv heads, head_dim, the softmax scale, "no QK norm"),
so a config and the equivalent keywords build equal specs even where one
leaves a value to be derived and the other spells it out, and a knob that
does nothing in its context (a QK norm type with use_qk_norm off) is not
stored at all. The cache's tagged choice is in layers/cache_specs.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from meshattn.configs.vocabulary import MODEL_MODES
from meshattn.layers.projections import Initializer

# Logical axis rules used when the layer is built without a config; the same
# table as configs/base.yml.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("prefill_activation_length", "context"),
    ("decode_batch", ("data", "fsdp", "autoregressive")),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("cache_batch", ("data", "fsdp", "autoregressive")),
    ("cache_heads", "tensor"),
    ("cache_sequence", "context"),
)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  """Sizes: inputs_q [B, T, emb_dim], inputs_kv [B, S, kv_emb_dim], N query heads and K kv
  heads of head_dim H, outputs [B, T, out_features]; every size resolved."""

  emb_dim: int  # D
  num_query_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  out_features: int
  kv_emb_dim: int
  position_streams: int  # n when inputs_positions are [n, batch..., T] (MRoPE), else 1

  @property
  def group_size(self) -> int:
    """G = N // K query heads per kv head (1: MHA, N: MQA)."""
    return self.num_query_heads // self.num_kv_heads

  @property
  def qkv_features(self) -> int:
    return self.num_query_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class TemperatureTuning:
  """Llama 4: queries of a layer without RoPE scaled by
  log(floor((position + 1) / floor_scale) + 1) * scale + 1."""

  scale: float = 0.1
  floor_scale: float = 8192.0


@dataclasses.dataclass(frozen=True)
class ProjectionSpec:
  """The Q/K/V and output projections, and what acts on q / k between them and the kernel
  (QK norm, temperature tuning; RoPE is `settings.rope`)."""

  fused_qkv: bool
  share_kv_projections: bool
  use_bias: bool
  qk_norm: str | None  # qk_norm_type when use_qk_norm, else None (no norm)
  normalization_layer_epsilon: float
  temperature_tuning: TemperatureTuning | None  # None: off
  quantization: str  # "" or "int8" (layers/quantization.py)
  qkv_dot_general: Callable[..., jax.Array] | None
  out_dot_general: Callable[..., jax.Array] | None
  kernel_init: Initializer
  bias_init: Initializer
  attention_output_gate: str  # none | elementwise | headwise (layers/output_gate.py)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """What the attention kernels are asked to do, besides the mask (`settings.mask`)."""

  attention: str  # train-mode kernel (vocabulary.TRAIN_KERNELS)
  decode_attention: str  # autoregressive kernel (vocabulary.DECODE_KERNELS)
  pallas_interpret: bool  # run Pallas TPU kernels in interpret mode (CPU tests)
  scale: float  # softmax scale: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5
  attn_logits_soft_cap: float | None  # None: no cap
  attention_sink: bool
  float32_qk_product: bool
  float32_logits: bool
  dropout_rate: float
  broadcast_dropout: bool
  attention_fn: Callable[..., jax.Array] | None  # a Flax-signature attention function
  score_mod: Callable[..., jax.Array] | None  # FlexAttention-style hooks (layers/score_mods.py)
  mask_mod: Callable[..., jax.Array] | None


@dataclasses.dataclass(frozen=True)
class ActivationAxes:
  """Logical names of the activations of one mode."""

  inputs: tuple[str | None, ...]  # inputs and layer output [B, T, D]
  query: tuple[str | None, ...]  # [B, T, N, H]
  key: tuple[str | None, ...]  # [B, S, K, H]
  value: tuple[str | None, ...]  # [B, S, K, H]
  out: tuple[str | None, ...]  # attention context [B, T, N, H]

  def __post_init__(self):
    if len(self.inputs) != 3:
      raise ValueError(f"input axis names need 3 entries [batch, length, embed], got {self.inputs}")
    for field in ("query", "key", "value", "out"):
      if len(getattr(self, field)) != 4:
        raise ValueError(f"{field} axis names need 4 entries [batch, length, heads, head_dim], "
                         f"got {getattr(self, field)}")


def _mode_axes(length: str, batch: str = "activation_batch") -> ActivationAxes:
  return ActivationAxes(
      inputs=(batch, length, "activation_embed"),
      query=(batch, length, "activation_heads", "activation_kv"),
      key=(batch, length, "activation_kv_heads", "activation_kv"),
      value=(batch, length, "activation_kv_heads", "activation_kv"),
      out=(batch, length, "activation_heads", "activation_kv"))


@dataclasses.dataclass(frozen=True)
class ModeAxes:
  """Activation logical names for each model_mode (hashable: layer settings are static)."""

  train: ActivationAxes = _mode_axes("activation_length")
  prefill: ActivationAxes = _mode_axes("prefill_activation_length")
  autoregressive: ActivationAxes = _mode_axes("decode_length", batch="decode_batch")

  def __getitem__(self, mode: str) -> ActivationAxes:
    if mode not in MODEL_MODES:
      raise ValueError(f"model_mode={mode!r}: allowed {MODEL_MODES}")
    return getattr(self, mode)


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
  """How the layer's arrays map onto the mesh: logical names -> mesh axes, and the logical
  names of each mode's activations (parameters carry theirs; the cache's are in
  `settings.cache`)."""

  logical_axis_rules: tuple[tuple[str, Any], ...] = DEFAULT_LOGICAL_AXIS_RULES
  axes: ModeAxes = ModeAxes()


@dataclasses.dataclass(frozen=True)
class LengthSpec:
  """Sequence lengths and the prefill policy (the same for every cache kind)."""

  max_target_length: int  # the cache's default length in tokens per slot
  max_prefill_predict_length: int  # the longest prompt one prefill call takes
  # Chunked prefill: a prefill call runs in chunks of this many tokens through the cache
  # (same outputs, bounded activation memory); None: the whole call at once
  # (config: prefill_chunk_size when use_chunked_prefill).
  prefill_chunk_size: int | None = None
