"""Reference attention for prefill / autoregressive steps over a KV cache.

Queries of the current step attend over (a) what the cache held before the
step and (b) the step's own new keys/values, with masks computed from token
positions (cached entries at position -1 are empty). The cache is read in
blocks with an online softmax, so a quantized cache is dequantized one block
at a time and never copied whole to full precision; the result equals
softmax attention over the concatenation (same order of operations as
dot_product.py: scale, soft cap, mask, float32 softmax with the sink).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.registry import ALL, Kernel, register
from meshattn.layers.kernels.train.dot_product import mod_indices
from meshattn.layers.kernels.shared.online_softmax import (
    NEG, finish, hide, live_keys, live_queries, online_step)
from meshattn.layers.masks import structural_mask

# The reference cached step (layers/cached_step.py, reading the cache through
# attend_with_cache) serves prefill and decode over every cache kind and mask kind;
# `dot_product` names it for those modes.
CACHED_FEATURES = frozenset({"gqa", "causal", "full", "window", "chunk", "soft_cap", "sinks",
                             "score_mod", "mask_mod", "quantized_kv", "paged_kv", "float32"})
register(Kernel("dot_product", ALL, frozenset({"prefill", "autoregressive"}), CACHED_FEATURES,
                "meshattn.layers.cached_step:cached_step", "reference cached, online softmax",
                protocol="cached"))

# (start index) -> key, value [B, block, K, H] and positions [B, block]
BlockReader = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _block_update(carry, q, key, value, q_pos, kv_pos, q_valid, options: KernelOptions):
  """One online-softmax step over a block of keys; carry = (m, l, acc).

  Entries no query of the step sees (past a slot's length, position -1; a
  padding token of the step) may hold anything, a previous occupant's NaN
  included: they are selected away, never multiplied by a mask
  (online_softmax.py).
  """
  m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
  batch, _, kv_heads, group = q.shape[:4]
  indices = mod_indices(batch, kv_heads, group, q_pos, kv_pos)
  allowed = structural_mask(options.mask, q_pos, kv_pos) & q_valid[:, :, None]  # [B, T, S]
  allowed = allowed[:, None, None]  # [B, 1, 1, T, S]
  if options.mask_mod is not None:
    allowed = allowed & options.mask_mod(*indices).astype(bool)
  live_q = live_queries(allowed)  # [B, T, 1|K, 1|G, 1]
  live_k = live_keys(allowed)  # [B, S, 1|K, 1]
  q, key, value = hide(q, live_q), hide(key, live_k), hide(value, live_k)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, precision=options.precision,
                      preferred_element_type=jnp.float32) * options.scale  # [B, K, G, T, S]
  if options.score_mod is not None:
    logits = options.score_mod(logits, *indices).astype(jnp.float32)
  if options.soft_cap:
    logits = options.soft_cap * jnp.tanh(logits / options.soft_cap)
  m_new, l_new, p, correction = online_step(m, l, logits, allowed)  # p: [B, K, G, T, S]
  pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(value.dtype), value, precision=options.precision,
                  preferred_element_type=jnp.float32)  # [B, K, G, T, H]
  # Zero forward for a query that sees nothing here; the select keeps its
  # cotangent (NaN on a padding row, say) out of dv = p^T dO.
  pv = jnp.where(jnp.moveaxis(live_q, 1, 3), pv, 0.0)  # [B, K, G, T, H]
  return m_new, l_new, acc * correction[..., None] + pv


def attend_with_cache(
    query: jax.Array,
    new_key: jax.Array,
    new_value: jax.Array,
    *,
    options: KernelOptions,
    q_positions: jax.Array,
    q_valid: jax.Array,
    new_positions: jax.Array,
    read_block: BlockReader,
    num_blocks: int,
    sinks: jax.Array | None = None,
) -> jax.Array:
  """query [B, T, N, H] over cached blocks and new_key/new_value [B, T, K, H].

  q_positions / new_positions [B, T]: token positions of the step's tokens
  (new_positions -1 for padding); q_valid [B, T]: which queries are real
  (others output zeros). Returns the context [B, T, N, H].
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_heads = new_key.shape[2]
  group = num_heads // kv_heads
  q = query.reshape(batch, q_len, kv_heads, group, head_dim)  # [B, T, K, G, H]
  shape = (batch, kv_heads, group, q_len)
  if sinks is not None:
    m0 = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1), shape)
    l0 = jnp.ones(shape, jnp.float32)  # the sink's own exp(sink - m0)
  else:
    m0 = jnp.full(shape, NEG, jnp.float32)
    l0 = jnp.zeros(shape, jnp.float32)
  carry = (m0, l0, jnp.zeros(shape + (new_value.shape[-1],), jnp.float32))
  update = lambda c, k, v, kv_pos: _block_update(c, q, k, v, q_positions, kv_pos, q_valid, options)

  def cache_step(carry, block_index):
    key, value, kv_pos = read_block(block_index)  # [B, bs, K, H], [B, bs]
    return update(carry, key, value, kv_pos), None

  carry, _ = jax.lax.scan(cache_step, carry, jnp.arange(num_blocks))
  m, l, acc = update(carry, new_key, new_value, new_positions)
  context = finish(l[..., None], acc)  # [B, K, G, T, H]
  context = jnp.transpose(context, (0, 3, 1, 2, 4)).reshape(batch, q_len, num_heads, -1)
  return context.astype(query.dtype)
