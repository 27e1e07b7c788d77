"""Splash attention (JAX's Pallas TPU flash kernel) behind the reference signature.

`splash_attention` takes exactly what `dot_product_attention` takes, so the
layer can swap kernels, and it returns the same numbers wherever it accepts
the inputs. Anything splash cannot express raises ValueError naming the
feature (the names of `SPLASH_FEATURES`) instead of silently differing.

What the reference does and how it maps onto splash:
  * scale: splash never scales the logits, so the query is pre-scaled.
  * soft cap: splash's `attn_logits_soft_cap` caps (q*scale).k, the same
    order as the reference (scale, then cap, then mask).
  * sinks: splash's per-query-head `sinks` enter the softmax denominator only,
    like the reference's extra sink column.
  * structural mask: splash masks are static and index based (CausalMask,
    LocalMask, ChunkedCausalMask, FullMask), so positions must be the token
    indices 0..T-1 / 0..S-1 (train mode). Concrete positions are checked;
    traced ones are trusted (the layer passes aranges in train mode).
  * GQA / MQA: splash's MHA kernel indexes kv head h // G for query head h
    (n = k * G + g, the reference layout) so K/V are never repeated; K = 1
    uses the MQA kernel, which takes a single [S, H] key.
  * batch: splash kernels are per example; they are vmapped over B (a
    lax.map in interpret mode, whose TPU interpreter cannot batch a kernel).
  * segment ids: splash attends within equal ids, padding (id 0) included,
    whereas the reference gives padding queries zeros; those rows (and any
    query whose segment has no visible key) are zeroed afterwards. Padding
    may hold NaN / inf, which splash would multiply into p @ V by a zero p:
    the q, k, v of tokens no real token pairs with are zeroed (a select)
    before the call.
The gradient is splash's own (custom_vjp with Pallas backward kernels).

Numerics: splash accumulates q.k and p.v in float32 whatever the input dtype,
so `float32_qk_product` / `float32_logits` are always in effect and
`precision` is not used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.masks import MaskSpec, segment_mask, structural_mask

# Every feature name a fast kernel may be asked for (see requested_features).
ALL_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "user_mask",
    "user_bias", "score_mod", "mask_mod", "dropout", "weights", "backward"})

# Splash has no bias/mask operand and no hook for arbitrary logits functions
# (its static masks are numpy objects, its mask_function sees only indices
# inside the kernel); it has no dropout and never forms the weights.
SPLASH_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "backward"})

# Splash's kv blocks must be multiples of the 128-lane vreg width.
_LANES = 128


# ---- Shared by the fast kernels (flash_gpu imports these) ----------------------


def requested_features(query: jax.Array, key: jax.Array, *, options: KernelOptions,
                       q_segment_ids, sinks, mask, bias, deterministic: bool,
                       return_weights: bool) -> frozenset[str]:
  """The feature names one call needs ("backward" is never requested here)."""
  kind = options.mask.attention_type
  wanted = {
      "gqa": key.shape[2] != query.shape[2],
      "causal": kind == "global",
      "full": kind == "full",
      "window": kind == "local_sliding",
      "chunk": kind == "chunk",
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
  """Fast kernels mask on token index, so positions must be 0..T-1 / 0..S-1.

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
  if spec.attention_type == "local_sliding" and last - spec.window + 1 > kv_len - 1:
    raise ValueError(f"{kernel}: window {spec.window} with q_len {q_len} > kv_len {kv_len} "
                     "leaves queries with no visible key")
  if spec.attention_type == "chunk" and (last // spec.chunk) * spec.chunk > kv_len - 1:
    raise ValueError(f"{kernel}: chunk {spec.chunk} with q_len {q_len} > kv_len {kv_len} "
                     "leaves queries with no visible key")


# ---- Splash --------------------------------------------------------------------


def _largest_block(length: int, name: str) -> int:
  for block in (512, 256, _LANES):
    if length % block == 0:
      return block
  raise ValueError(f"splash_attention needs {name} to be a multiple of {_LANES}, got {length} "
                   "(or pass block_sizes)")


def default_block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
  """The largest of 512 / 256 / 128 dividing each length, backward blocks included."""
  bq, bkv = _largest_block(q_len, "q_len"), _largest_block(kv_len, "kv_len")
  return splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)


def _chunked_causal_mask(shape: tuple[int, int], chunk: int) -> splash_mask.Mask:
  """Causal within `chunk`-token chunks; a NumpyMask where splash lacks the lazy one."""
  lazy = getattr(splash_mask, "ChunkedCausalMask", None)
  if lazy is not None:
    return lazy(shape, chunk_size=chunk)
  q = np.arange(shape[0])[:, None]  # [T, 1]
  k = np.arange(shape[1])[None, :]  # [1, S]
  return splash_mask.NumpyMask((k <= q) & (q // chunk == k // chunk))  # [T, S]


def splash_mask_for(spec: MaskSpec, q_len: int, kv_len: int) -> splash_mask.Mask:
  """The index-based splash mask equal to `structural_mask` on aranges."""
  shape = (q_len, kv_len)
  if spec.attention_type == "global":
    return splash_mask.CausalMask(shape)
  if spec.attention_type == "local_sliding":
    # The query at t sees t-window+1 .. t: window-1 keys to the left, none to the right.
    return splash_mask.LocalMask(shape, window_size=(spec.window - 1, 0), offset=0)
  if spec.attention_type == "chunk":
    return _chunked_causal_mask(shape, spec.chunk)
  return splash_mask.FullMask(shape)


@functools.lru_cache(maxsize=64)
def _splash_kernel(spec: MaskSpec, q_len: int, kv_len: int, num_heads: int, mqa: bool,
                   soft_cap: float | None, block_sizes: splash.BlockSizes, interpret: bool):
  """Build (and cache: mask processing is numpy work per shape) one splash kernel."""
  head_mask = splash_mask_for(spec, q_len, kv_len)
  mask = splash_mask.MultiHeadMask([head_mask] * num_heads)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  # TPU interpret mode (simulated TPU memories) runs the kernel on CPU; it is
  # passed to the kernel itself, not set as a context, so that the backward
  # kernels traced later by jax.grad are interpreted too.
  # ensure_compile_time_eval: the kernel stores its block tables as arrays; a
  # first call under jit must not turn them into tracers kept in the cache.
  with jax.ensure_compile_time_eval():
    return make(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                attn_logits_soft_cap=soft_cap,
                interpret=pltpu.InterpretParams() if interpret else False)


def _same_ids(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> bool:
  """True when the kv ids are known to be the query ids (self-attention)."""
  if q_segment_ids is kv_segment_ids:
    return True
  if isinstance(q_segment_ids, jax.core.Tracer) or isinstance(kv_segment_ids, jax.core.Tracer):
    return False
  return q_segment_ids.shape == kv_segment_ids.shape and bool(
      np.array_equal(np.asarray(q_segment_ids), np.asarray(kv_segment_ids)))


def rows_with_keys(spec: MaskSpec, q_positions, kv_positions, q_segment_ids,
                   kv_segment_ids) -> jax.Array:
  """[B, T] True where a query has at least one visible key (segments included).

  Self-attention with one ids array needs no scan: every structural mask keeps
  the diagonal, so a query sees at least itself unless its id is 0. Otherwise
  the [B, T, S] comparison is reduced at once (XLA fuses it; nothing of size
  T x S is stored).
  """
  q_len, kv_len = q_positions.shape[-1], kv_positions.shape[-1]
  if q_len == kv_len and _same_ids(q_segment_ids, kv_segment_ids):
    return q_segment_ids != 0  # [B, T]
  allowed = structural_mask(spec, q_positions, kv_positions) & segment_mask(
      q_segment_ids, kv_segment_ids)  # [B, T, S]
  return allowed.any(axis=-1)  # [B, T]


def keys_with_rows(q_segment_ids, kv_segment_ids) -> jax.Array:
  """[B, S] True where some query shares a key's (non-zero) segment; as rows_with_keys."""
  if _same_ids(q_segment_ids, kv_segment_ids):
    return kv_segment_ids != 0  # [B, S]
  return segment_mask(q_segment_ids, kv_segment_ids).any(axis=1)  # [B, S]


def splash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    options: KernelOptions,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sinks: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    interpret: bool = False,
    block_sizes: splash.BlockSizes | None = None,
) -> tuple[jax.Array, None]:
  """Splash attention of query [B, T, N, H] over key/value [B, S, K, H].

  Same arguments and results as `dot_product_attention` (weights are always
  None), plus `interpret` (run the Pallas kernels in TPU interpret mode, e.g.
  on CPU in tests) and `block_sizes` (default: the largest of 512/256/128
  dividing each length). Lengths must be multiples of 128.
  """
  del dropout_rng  # dropout is rejected below; the rng has nothing to do
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if num_heads % kv_heads:
    raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {kv_heads}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  requested = requested_features(
      query, key, options=options, q_segment_ids=q_segment_ids, sinks=sinks, mask=mask,
      bias=bias, deterministic=deterministic, return_weights=return_weights)
  reject_unsupported("splash_attention", SPLASH_FEATURES, requested)
  check_index_positions(q_positions, kv_positions, q_len, kv_len, "splash_attention")
  check_no_empty_rows(options.mask, q_len, kv_len, "splash_attention")
  if block_sizes is None:
    block_sizes = default_block_sizes(q_len, kv_len)

  mqa = kv_heads == 1
  kernel = _splash_kernel(options.mask, q_len, kv_len, num_heads, mqa, options.soft_cap or None,
                          block_sizes, bool(interpret))

  # Splash does not scale; (q * scale) . k is the reference's (q . k) * scale.
  q = (query * jnp.asarray(options.scale, query.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
  k = key.transpose(0, 2, 1, 3)  # [B, K, S, H]
  v = value.transpose(0, 2, 1, 3)  # [B, K, S, H]
  if mqa:
    k, v = k[:, 0], v[:, 0]  # [B, S, H]
  segments = None
  if q_segment_ids is not None:
    segments = splash.SegmentIds(q=q_segment_ids.astype(jnp.int32),
                                 kv=kv_segment_ids.astype(jnp.int32))  # [B, T] / [B, S]
    # Splash zeroes the p of a masked pair but still multiplies it into p @ V
    # (0 * NaN = NaN), and lets padding attend to padding: the tokens no real
    # token pairs with are zeroed by a select first, so whatever they hold
    # reaches no visible output or gradient (as in online_softmax.py).
    live_q = rows_with_keys(options.mask, q_positions, kv_positions, q_segment_ids,
                            kv_segment_ids)  # [B, T]
    live_k = keys_with_rows(q_segment_ids, kv_segment_ids)  # [B, S]
    q = jnp.where(live_q[:, None, :, None], q, jnp.zeros((), q.dtype))  # [B, N, T, H]
    live_k = live_k[:, :, None] if mqa else live_k[:, None, :, None]  # [B, S, 1] / [B, 1, S, 1]
    k, v = (jnp.where(live_k, x, jnp.zeros((), x.dtype)) for x in (k, v))

  def one_example(q, k, v, segments):
    return kernel(q, k, v, segment_ids=segments, sinks=sinks)  # [N, T, H]

  if interpret:
    # The TPU interpreter cannot batch a pallas_call (vmap adds a grid axis its
    # dimension_semantics lack), so interpret mode loops over the batch.
    context = jax.lax.map(lambda args: one_example(*args), (q, k, v, segments))  # [B, N, T, H]
  else:
    context = jax.vmap(one_example)(q, k, v, segments)  # [B, N, T, H]
  context = context.transpose(0, 2, 1, 3)  # [B, T, N, H]
  if q_segment_ids is not None:
    # Also zeroes those rows' cotangents before splash's backward sees them.
    context = jnp.where(live_q[:, :, None, None], context, jnp.zeros((), context.dtype))
  return context.astype(query.dtype), None
