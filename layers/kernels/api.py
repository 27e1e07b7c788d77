"""The kernels' shared contract: options, the call's operands, and the checks run once.

Two protocols:

* train (`train/`): `kernel(query [B, T, N, H], key, value [B, S, K, H], *, options,
  q_positions [B, T], kv_positions [B, S], q_segment_ids, kv_segment_ids, sinks [N], mask,
  bias, dropout_rng, deterministic, return_weights, **tuning) -> (context [B, T, N, H],
  weights [B, N, T, S] or None)`. An implementation is written as
  `impl(query, key, value, call: TrainCall, **tuning)` and wrapped by `train_kernel`,
  which gives it that keyword signature and runs the checks every train kernel shares
  (head grouping, segment ids given together, features it lacks, index positions for
  kernels that mask by token index) before the implementation sees the call.
* decode (`decode/`): `kernel(query [B, N, H], **view.arrays(), scale, soft_cap, sinks,
  [window]) -> [B, N, H]`, where the view is the cache's typed view of itself
  (kvcache/views.py: contiguous or paged): its arrays, named as the kernel's keyword
  arguments, and their logical axes. `decode_kernel(layout)` wraps an implementation
  with the checks every decode kernel of that layout shares (`check_decode_operands`).

Each kernel registers itself with the registry in its own file (registry.train_variant /
decode_variant, beside the function), from the same feature constant its checks read. No
kernel imports another platform's kernel module: what they share lives here or in
`shared/`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.configs import vocabulary as vocab
from meshattn.configs.vocabulary import MASK_FEATURE
from meshattn.layers.masks import MaskSpec


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Static options of one attention call (hashable, so jit-friendly)."""

  mask: MaskSpec = MaskSpec()
  scale: float = 1.0
  soft_cap: float | None = None
  float32_qk_product: bool = False
  float32_logits: bool = False
  dropout_rate: float = 0.0
  broadcast_dropout: bool = True
  precision: jax.lax.Precision | None = None
  # FlexAttention-style hooks (see meshattn.layers.score_mods for prebuilt ones).
  score_mod: Callable[..., jax.Array] | None = None
  mask_mod: Callable[..., jax.Array] | None = None

  def __post_init__(self):
    if self.soft_cap is not None and self.soft_cap <= 0:
      raise ValueError(f"attn_logits_soft_cap={self.soft_cap}: must be > 0 (or None/0 to disable)")
    if not vocab.dropout_in_range(self.dropout_rate):
      raise ValueError(f"dropout_rate={self.dropout_rate}: allowed {vocab.DROPOUT_RANGE}")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids",
                                "sinks", "mask", "bias", "dropout_rng"],
                   meta_fields=["options", "deterministic", "return_weights"])
@dataclasses.dataclass(frozen=True)
class TrainCall:
  """One train-kernel call besides Q/K/V: a pytree of its arrays (None where absent) with
  the static options and flags as metadata."""

  options: KernelOptions
  q_positions: jax.Array  # [B, T]: drive the structural mask (a key position < 0 is empty)
  kv_positions: jax.Array  # [B, S]
  q_segment_ids: jax.Array | None = None  # [B, T]: packing ids, 0 = padding
  kv_segment_ids: jax.Array | None = None  # [B, S]
  sinks: jax.Array | None = None  # [N]: per-head sink logits
  mask: jax.Array | None = None  # broadcastable to [B, N, T, S], True = attend
  bias: jax.Array | None = None  # broadcastable to [B, N, T, S]
  dropout_rng: jax.Array | None = None
  deterministic: bool = True
  return_weights: bool = False

  # What each array's dimensions index, so shard_map wrappers (kernels/sharded.py) give
  # each the mesh axes of the query / key dimension it follows; a broadcast (size 1)
  # dimension is never split, nor a None one (a mask's keys: each shard's queries see every
  # key). The dropout key is not an array to split.
  DIMS = {"q_positions": ("batch", "q_length"), "kv_positions": ("batch", "kv_length"),
          "q_segment_ids": ("batch", "q_length"), "kv_segment_ids": ("batch", "kv_length"),
          "sinks": ("heads",), "mask": ("batch", "heads", "q_length", None),
          "bias": ("batch", "heads", "q_length", None)}

  @property
  def dropout(self) -> bool:
    """Dropout happens only when it is both configured and active."""
    return self.options.dropout_rate > 0.0 and not self.deterministic


# Every feature name a train call may ask of a kernel (see requested_features).
ALL_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "user_mask",
    "user_bias", "score_mod", "mask_mod", "dropout", "weights", "backward"})


def requested_features(query: jax.Array, key: jax.Array, *, options: KernelOptions,
                       q_segment_ids, sinks, mask, bias, deterministic: bool,
                       return_weights: bool) -> frozenset[str]:
  """The feature names one call needs ("backward" is never requested here)."""
  wanted = {
      MASK_FEATURE[options.mask.attention_type]: True,
      "gqa": key.shape[2] != query.shape[2],
      "segment_ids": q_segment_ids is not None,
      "soft_cap": bool(options.soft_cap),
      "sinks": sinks is not None,
      "user_mask": mask is not None,
      "user_bias": bias is not None,
      "score_mod": options.score_mod is not None,
      "mask_mod": options.mask_mod is not None,
      # Dropout only happens when it is both configured and active.
      "dropout": options.dropout_rate > 0.0 and not deterministic,
      "weights": return_weights,
  }
  return frozenset(name for name, on in wanted.items() if on)


def reject_unsupported(kernel: str, supported: frozenset[str], requested: frozenset[str]) -> None:
  """ValueError naming every requested feature the kernel lacks (never a silent fallback)."""
  missing = sorted(requested - supported)
  if missing:
    raise ValueError(
        f"{kernel} does not support {', '.join(missing)}; it supports {sorted(supported)}. "
        "Use the dot_product kernel for these features.")


def check_index_positions(q_positions: jax.Array, kv_positions: jax.Array, q_len: int,
                          kv_len: int, kernel: str) -> None:
  """Kernels that mask on token index need positions 0..T-1 / 0..S-1.

  Positions under a trace cannot be inspected and are trusted (the layer's
  train mode passes aranges); concrete ones that differ raise ValueError,
  since ignoring them would silently change the mask.
  """
  for name, positions, length in (("q_positions", q_positions, q_len),
                                  ("kv_positions", kv_positions, kv_len)):
    if positions.shape[-1] != length:
      raise ValueError(f"{kernel}: {name} has length {positions.shape[-1]}, expected {length}")
    if isinstance(positions, jax.core.Tracer):
      continue
    if not np.array_equal(np.asarray(positions),
                          np.broadcast_to(np.arange(length), positions.shape)):
      raise ValueError(
          f"{kernel}: {name} must be the token indices 0..{length - 1} (its masks are index "
          "based, train mode only); use the dot_product kernel for other positions")


def check_no_empty_rows(spec: MaskSpec, q_len: int, kv_len: int, kernel: str) -> None:
  """Reject structural masks that leave some query with no key at all.

  The reference returns zeros for such rows; flash kernels skip fully masked
  blocks and divide by an empty softmax sum (NaN forward and backward), so the
  case is refused rather than patched. Only cross-attention with q_len > kv_len
  reaches it: causal rows always see key 0, full rows every key.
  """
  last = q_len - 1
  if spec.window and last - spec.window + 1 > kv_len - 1:
    raise ValueError(f"{kernel}: window {spec.window} with q_len {q_len} > kv_len {kv_len} "
                     "leaves queries with no visible key")
  if spec.chunk and (last // spec.chunk) * spec.chunk > kv_len - 1:
    raise ValueError(f"{kernel}: chunk {spec.chunk} with q_len {q_len} > kv_len {kv_len} "
                     "leaves queries with no visible key")


def check_head_groups(num_heads: int, kv_heads: int) -> None:
  """Query heads a multiple of the kv heads (n = k * G + g), for every kernel protocol."""
  if num_heads % kv_heads:
    raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {kv_heads}")


def check_operands(query: jax.Array, key: jax.Array, call: TrainCall) -> None:
  """What every train kernel requires of its operands: query heads a multiple of the kv
  heads (n = k * G + g), and segment ids for queries and keys together or not at all."""
  check_head_groups(query.shape[2], key.shape[2])
  if (call.q_segment_ids is None) != (call.kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")


def check_half_precision(query: jax.Array, key: jax.Array, value: jax.Array, kernel: str) -> None:
  """Kernels that run float16 / bfloat16 only (cuDNN, tokamax): query, key and value of one
  of those dtypes."""
  if (query.dtype not in (jnp.float16, jnp.bfloat16) or key.dtype != query.dtype
      or value.dtype != query.dtype):
    raise ValueError(f"{kernel} needs float16 or bfloat16 query/key/value of one dtype, "
                     f"got {query.dtype}/{key.dtype}/{value.dtype}")


TrainImpl = Callable[..., tuple[jax.Array, jax.Array | None]]


def train_kernel(name: str, features: frozenset[str] | None = None, *,
                 index_masked: bool | Callable[[KernelOptions], bool] = False,
                 no_empty_rows: bool = False,
                 half_precision: bool = False) -> Callable[[TrainImpl], Callable]:
  """Register-time wrapper of a train implementation `impl(query, key, value, call, **tuning)`.

  The wrapped kernel takes the train protocol's keywords (module doc), builds the
  `TrainCall` and checks, once for every kernel: `check_operands`; the requested features
  against `features` (None: the implementation checks its own, or takes every feature); for
  `index_masked` kernels (flash: masks from token indices inside the call; a predicate of
  the options where only some masks are) that the positions are the token indices; with
  `no_empty_rows`, that no query is left without a key; with `half_precision`, that query,
  key and value are float16 or bfloat16, of one dtype.
  """

  def wrap(impl: TrainImpl) -> Callable:
    @functools.wraps(impl)
    def kernel(query: jax.Array, key: jax.Array, value: jax.Array, *, options: KernelOptions,
               q_positions: jax.Array, kv_positions: jax.Array,
               q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
               sinks: jax.Array | None = None, mask: jax.Array | None = None,
               bias: jax.Array | None = None, dropout_rng: jax.Array | None = None,
               deterministic: bool = True, return_weights: bool = False, **tuning):
      call = TrainCall(options, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sinks,
                       mask, bias, dropout_rng, deterministic, return_weights)
      check_operands(query, key, call)
      if features is not None:
        requested = requested_features(
            query, key, options=options, q_segment_ids=q_segment_ids, sinks=sinks, mask=mask,
            bias=bias, deterministic=deterministic, return_weights=return_weights)
        reject_unsupported(name, features, requested)
      q_len, kv_len = query.shape[1], key.shape[1]
      if index_masked is True or (callable(index_masked) and index_masked(options)):
        check_index_positions(q_positions, kv_positions, q_len, kv_len, name)
      if no_empty_rows:
        check_no_empty_rows(options.mask, q_len, kv_len, name)
      if half_precision:
        check_half_precision(query, key, value, name)
      return impl(query, key, value, call, **tuning)

    kernel.features = features
    kernel.index_masked = index_masked  # registry.train_variant reads it (masks_by_index)
    return kernel

  return wrap


# ---- the decode protocol ----------------------------------------------------------------

DECODE_LAYOUTS = ("contiguous", "paged")


def check_decode_operands(layout: str, query, key, value, *, key_scale=None, value_scale=None,
                          window=None, sinks=None, page_table=None, page_owner=None,
                          slots=None) -> None:
  """What every decode kernel of `layout` requires of its operands (ValueError naming one):
  query [B, N, H] with N a multiple of the kv heads; key and value of one shape, a
  contiguous cache's [B, S, K, H] or a page pool's [P, tpp, K, H]; integer K/V with their
  scales, both scales or none, shaped as the layout stores them (contiguous: head-major
  [B, K or 1, S]; paged: [P, tpp, K or 1]); sinks [N]; a window >= 1 (contiguous); and
  for a paged cache, integer page_owner [P] and slots [B] (the kernels read only pages a
  row's slot owns)."""
  if layout not in DECODE_LAYOUTS:
    raise ValueError(f"decode layout {layout!r}: allowed {DECODE_LAYOUTS}")
  if key.ndim != 4 or value.shape != key.shape:
    raise ValueError(f"key and value must be of one [.., .., K, H] shape, got {key.shape} and "
                     f"{value.shape}")
  if query.ndim != 3 or query.shape[2] != key.shape[3]:
    raise ValueError(f"query must be [B, N, H] with H = {key.shape[3]}, got {query.shape}")
  num_heads, kv_heads = query.shape[1], key.shape[2]
  check_head_groups(num_heads, kv_heads)
  if sinks is not None and jnp.shape(sinks) != (num_heads,):
    raise ValueError(f"sinks must be [N] = [{num_heads}], got {jnp.shape(sinks)}")
  if window is not None and window < 1:
    raise ValueError(f"window={window}: must be >= 1 (or None)")
  for name, x, scale in (("key", key, key_scale), ("value", value, value_scale)):
    if jnp.issubdtype(x.dtype, jnp.integer) and scale is None:
      raise ValueError(f"{name} is {x.dtype} but no {name}_scale was given")
  if (key_scale is None) != (value_scale is None):
    raise ValueError("key_scale and value_scale must be given together")
  if layout == "contiguous":
    batch, kv_len = key.shape[:2]
    for name, scale in (("key_scale", key_scale), ("value_scale", value_scale)):
      if scale is not None and (scale.ndim != 3 or scale.shape[0] != batch
                                or scale.shape[2] != kv_len or scale.shape[1] not in (kv_heads, 1)):
        raise ValueError(f"{name} must be [B, K or 1, S] = [{batch}, {kv_heads} or 1, {kv_len}] "
                         f"(head-major, as the cache stores it), got {scale.shape}")
    return
  pages, tpp = key.shape[:2]
  for name, scale in (("key_scale", key_scale), ("value_scale", value_scale)):
    if scale is not None and (scale.ndim != 3 or scale.shape[:2] != (pages, tpp)
                              or scale.shape[2] not in (kv_heads, 1)):
      raise ValueError(f"{name} must be [P, tpp, K or 1] = [{pages}, {tpp}, {kv_heads} or 1] "
                       f"(per page, as the pool stores it), got {scale.shape}")
  for name, x, shape in (("page_owner", page_owner, key.shape[:1]),
                         ("slots", slots, jnp.shape(page_table)[:1])):
    dtype = None if x is None else jnp.asarray(x).dtype
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array (the paged kernels read only pages "
                       f"each row's slot owns), got {dtype}")
    if tuple(jnp.shape(x)) != tuple(shape):
      raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}; expected {tuple(shape)} "
                       "(page_owner: one slot per pool page; slots: one per table row)")


def decode_kernel(layout: str) -> Callable[[Callable], Callable]:
  """Register-time wrapper of a decode implementation of `layout` ("contiguous":
  `fn(query, key, value, lengths, *, ...)`; "paged": `fn(query, key_pages, value_pages,
  page_table, lengths, *, page_owner, slots, ...)`): runs `check_decode_operands` once,
  before the implementation, which keeps only the checks of its own (dtypes it loads,
  tuning knobs)."""
  if layout not in DECODE_LAYOUTS:
    raise ValueError(f"decode layout {layout!r}: allowed {DECODE_LAYOUTS}")

  names = ("key", "value") if layout == "contiguous" else ("key_pages", "value_pages")

  def wrap(impl: Callable) -> Callable:
    signature = inspect.signature(impl)

    @functools.wraps(impl)
    def kernel(*args, **kwargs):
      # Callers pass the view's arrays by name (cached_step) or by position (tests, benches).
      bound = signature.bind(*args, **kwargs).arguments
      get = lambda name: bound.get(name)
      check_decode_operands(layout, get("query"), get(names[0]), get(names[1]),
                            key_scale=get("key_scale"), value_scale=get("value_scale"),
                            window=get("window"), sinks=get("sinks"),
                            page_table=get("page_table"), page_owner=get("page_owner"),
                            slots=get("slots"))
      return impl(*args, **kwargs)

    kernel.decode_layout = layout
    return kernel

  return wrap
