"""Adapter for a user `attention_fn` with Flax's `dot_product_attention` signature.

Flax parity: `attention_fn(query, key, value, bias=, mask=, broadcast_dropout=,
dropout_rng=, dropout_rate=, deterministic=, dtype=, precision=, module=)`
with query/key/value [batch, length, heads, head_dim] and the same number of
heads in all three. The adapter therefore repeats K/V heads for GQA/MQA,
folds every mask (causal / window / chunk, segments, the user's) into the
boolean `mask`, and pre-scales the query so that Flax's own 1/sqrt(head_dim)
turns into the layer's softmax scale. Soft cap and sinks have no place in that
signature, so asking for them with an attention_fn is an error.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.train.dot_product import visible_mask


def call_flax_attention_fn(
    attention_fn: Callable[..., jax.Array], query, key, value, *, options: KernelOptions,
    q_positions, kv_positions, q_segment_ids, kv_segment_ids, sinks, mask, bias, dropout_rng,
    deterministic, dtype, precision) -> tuple[jax.Array, None]:
  """Run attention_fn on query [B, T, N, H], key/value [B, S, K, H]; returns ([B, T, N, H], None)."""
  if options.soft_cap:
    raise ValueError("attention_fn cannot apply attn_logits_soft_cap (not in the Flax signature); "
                     "use the built-in kernels")
  if options.score_mod is not None:
    raise ValueError("attention_fn cannot apply score_mod (not in the Flax signature); "
                     "use the built-in kernels")
  if sinks is not None:
    raise ValueError("attention_fn cannot apply attention_sink (not in the Flax signature); "
                     "use the built-in kernels")
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads
  key = jnp.repeat(key, group, axis=2)  # [B, S, N, H]
  value = jnp.repeat(value, group, axis=2)  # [B, S, N, H]
  user = None if mask is None else jnp.broadcast_to(
      mask.reshape((1,) * (4 - mask.ndim) + mask.shape), (batch, mask.shape[-3] if mask.ndim >= 3 else 1,
                                                          q_len, kv_len))
  allowed = visible_mask(options, q_positions, kv_positions, q_segment_ids, kv_segment_ids, None,
                         kv_heads=num_heads, group=1)  # [B, 1 or N, 1, T, S]: K/V are repeated
  allowed = allowed[:, :, 0]  # [B, 1 or N, T, S]
  if user is not None:
    allowed = allowed & user.astype(bool)  # [B, 1 or N, T, S]
  query = query * jnp.asarray(options.scale * math.sqrt(head_dim), query.dtype)
  context = attention_fn(
      query, key, value, bias=bias, mask=allowed, broadcast_dropout=options.broadcast_dropout,
      dropout_rng=dropout_rng, dropout_rate=options.dropout_rate, deterministic=deterministic,
      dtype=dtype, precision=precision)
  # Flax spreads a row with no visible key uniformly; the layer's contract is zeros.
  has_key = jnp.any(allowed, axis=-1)  # [B, 1 or N, T]
  context = context * jnp.swapaxes(has_key, 1, 2)[..., None].astype(context.dtype)  # [B, T, N, H]
  return context, None
