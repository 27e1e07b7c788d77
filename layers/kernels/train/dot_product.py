"""The reference kernel: plain dot-product attention with every feature.

Every other kernel is tested against this one, and this one against a float64
NumPy implementation (tests/helpers/numpy_reference.py). It materialises the
[B, K, G, T, S] logits, so it is for correctness and short sequences.

GQA / MQA never repeat K/V: queries are viewed as [B, T, K, G, H] (query head
n = k * G + g) and contracted against the K key heads directly.

Order of operations on the logits (the same in every kernel):
  logits = (q . k) * scale  (+ bias)  -> score_mod  -> soft cap c*tanh(logits/c)
  -> mask (structural & segments & user mask & mask_mod)
  -> softmax (float32) over [keys..., sink]  -> drop the sink column  -> dropout.
score_mod(score, batch, head, q_idx, kv_idx) and mask_mod(batch, head, q_idx,
kv_idx) follow FlexAttention: index arguments are int arrays broadcastable
against the scores, q_idx / kv_idx are the token positions the masks use.
A row with no visible key produces zeros (never NaN). Whatever an invisible
token holds (NaN, inf) never reaches a visible output or its gradients: masks
select (jnp.where), they never multiply (see online_softmax.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.api import ALL_FEATURES, KernelOptions, TrainCall, train_kernel
from meshattn.layers.kernels.registry import ALL, FLOAT32, train_variant
from meshattn.layers.kernels.shared.online_softmax import hide, live_keys, live_queries
from meshattn.layers.masks import MaskSpec, segment_mask, structural_mask


def to_group_layout(x: jax.Array | None, batch: int, kv_heads: int, q_len: int, kv_len: int,
                    name: str) -> jax.Array | None:
  """A user mask/bias broadcastable to [B, N, T, S] -> [B, K, G or 1, T, S]."""
  if x is None:
    return None
  if x.ndim > 4:
    raise ValueError(f"{name} must be broadcastable to [batch, heads, q_len, kv_len], got shape {x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)  # [b, n, t, s] with broadcastable 1s
  heads = x.shape[1]
  x = jnp.broadcast_to(x, (batch, heads, q_len, kv_len))
  if heads == 1:
    return x[:, None]  # [B, 1, 1, T, S]
  if heads % kv_heads:
    raise ValueError(f"{name} has {heads} heads; expected 1 or num_query_heads")
  return x.reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)  # [B, K, G, T, S]


def mod_indices(batch: int, kv_heads: int, group: int, q_positions, kv_positions):
  """(batch, head, q_idx, kv_idx) int arrays broadcastable to [B, K, G, T, S]."""
  b = jnp.arange(batch, dtype=jnp.int32).reshape(batch, 1, 1, 1, 1)
  head = (jnp.arange(kv_heads, dtype=jnp.int32)[:, None] * group
          + jnp.arange(group, dtype=jnp.int32)[None, :]).reshape(1, kv_heads, group, 1, 1)
  q_idx = q_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
  kv_idx = kv_positions[:, None, None, None, :]  # [B, 1, 1, 1, S]
  return b, head, q_idx, kv_idx


def visible_mask(options: KernelOptions, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                 user_mask, kv_heads: int = 1, group: int = 1) -> jax.Array:
  """Which (query, key) pairs may attend: [B, 1 or K, 1 or G, T, S] boolean."""
  allowed = structural_mask(options.mask, q_positions, kv_positions)  # [B, T, S]
  if q_segment_ids is not None:
    allowed = allowed & segment_mask(q_segment_ids, kv_segment_ids)  # [B, T, S]
  allowed = allowed[:, None, None]  # [B, 1, 1, T, S]
  if user_mask is not None:
    allowed = allowed & user_mask.astype(bool)
  if options.mask_mod is not None:
    indices = mod_indices(q_positions.shape[0], kv_heads, group, q_positions, kv_positions)
    allowed = allowed & options.mask_mod(*indices).astype(bool)
  return allowed


@train_variant("dot_product", ALL, ALL_FEATURES | FLOAT32, "reference einsum",
               materializes_logits=True)
@train_kernel("dot_product_attention")
def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          call: TrainCall) -> tuple[jax.Array, jax.Array | None]:
  """Attention of query [B, T, N, H] over key/value [B, S, K, H].

  q_positions [B, T] / kv_positions [B, S] drive the structural mask (a key
  position < 0 is an empty slot); segment ids [B, T] / [B, S] restrict
  attention to the same packed segment; `mask` (True = attend) and `bias`
  broadcast to [B, N, T, S]; `sinks` [N] are per-head sink logits.

  Returns (context [B, T, N, H], weights [B, N, T, S] or None).
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads

  mask5 = to_group_layout(call.mask, batch, kv_heads, q_len, kv_len, "mask")
  allowed = visible_mask(call.options, call.q_positions, call.kv_positions, call.q_segment_ids, call.kv_segment_ids, mask5,
                         kv_heads, group)  # [B, 1|K, 1|G, T, S]
  # Rows no pair uses (padding, empty slots) may hold NaN / inf: zeroed by a
  # select, or 0 * NaN would reach p @ V, dq and dk (online_softmax.py).
  live_q = live_queries(allowed)  # [B, T, 1|K, 1|G, 1]
  live_k = live_keys(allowed)  # [B, S, 1|K, 1]
  key, value = hide(key, live_k), hide(value, live_k)  # [B, S, K, H]
  q = hide(query.reshape(batch, q_len, kv_heads, group, head_dim), live_q)  # [B, T, K, G, H]
  logits = jnp.einsum(
      "BTKGH,BSKH->BKGTS", q, key, precision=call.options.precision,
      preferred_element_type=jnp.float32 if call.options.float32_qk_product else None)  # [B, K, G, T, S]
  if call.options.float32_logits:
    logits = logits.astype(jnp.float32)
  logits = logits * jnp.asarray(call.options.scale, logits.dtype)
  bias5 = to_group_layout(call.bias, batch, kv_heads, q_len, kv_len, "bias")
  if bias5 is not None:
    logits = logits + bias5.astype(logits.dtype)
  if call.options.score_mod is not None:
    indices = mod_indices(batch, kv_heads, group, call.q_positions, call.kv_positions)
    logits = call.options.score_mod(logits, *indices).astype(logits.dtype)
  if call.options.soft_cap:
    cap = jnp.asarray(call.options.soft_cap, logits.dtype)
    logits = cap * jnp.tanh(logits / cap)

  # A large finite negative (not -inf) keeps fully masked rows NaN-free; their
  # probabilities are zeroed below.
  logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min / 2)  # [B, K, G, T, S]

  # Softmax always runs in float32 (as jax.nn.dot_product_attention does);
  # float32_logits moves the cast earlier, before scale, bias and soft cap.
  logits = logits.astype(jnp.float32)
  if call.sinks is not None:
    sink = call.sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1, 1)  # [1, K, G, 1, 1]
    sink = jnp.broadcast_to(sink, logits.shape[:-1] + (1,))  # [B, K, G, T, 1]
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :kv_len]
  else:
    probs = jax.nn.softmax(logits, axis=-1)  # [B, K, G, T, S]
  probs = jnp.where(allowed, probs, 0.0)

  if call.options.dropout_rate > 0.0 and not call.deterministic:
    if call.dropout_rng is None:
      raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout rng")
    keep_prob = 1.0 - call.options.dropout_rate
    # broadcast_dropout: one mask for every batch element and head, like Flax.
    shape = (1, 1, 1, q_len, kv_len) if call.options.broadcast_dropout else probs.shape
    keep = jax.random.bernoulli(call.dropout_rng, keep_prob, shape)
    probs = probs * (keep.astype(probs.dtype) / jnp.asarray(keep_prob, probs.dtype))

  context = jnp.einsum(
      "BKGTS,BSKH->BTKGH", probs.astype(value.dtype), value,
      precision=call.options.precision)  # [B, T, K, G, H]
  # Already zero forward. The select zeroes the cotangent of a query that sees
  # nothing: a NaN sent back to a padding row would reach dv through p^T dO.
  context = hide(context, live_q)  # [B, T, K, G, H]
  context = context.reshape(batch, q_len, num_heads, value.shape[-1])  # [B, T, N, H]
  weights = probs.reshape(batch, num_heads, q_len, kv_len) if call.return_weights else None
  return context, weights
