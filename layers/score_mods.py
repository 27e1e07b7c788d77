"""Prebuilt score_mod / mask_mod hooks (FlexAttention style).

    score_mod(score, batch, head, q_idx, kv_idx) -> score
    mask_mod(batch, head, q_idx, kv_idx) -> bool (True = may attend)

Index arguments are int arrays broadcastable against the scores; q_idx and
kv_idx are token positions. A kernel that honours the hooks applies
score_mod after scale and bias, before the soft cap, and ANDs mask_mod into
its structural mask. Pass them as `Attention(..., score_mod=..., mask_mod=...)`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ScoreMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
MaskMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes 2^(-8 i / n) for n a power of two, interleaved otherwise (Press et al.)."""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    return np.asarray(powers(num_heads), np.float32)
  closest = 2 ** math.floor(math.log2(num_heads))
  extra = powers(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(powers(closest) + extra, np.float32)


def alibi(num_heads: int) -> ScoreMod:
  """Linear distance penalty: score - slope[head] * (q_idx - kv_idx)."""
  slopes = jnp.asarray(alibi_slopes(num_heads))

  def score_mod(score, batch, head, q_idx, kv_idx):
    return score - slopes[head] * (q_idx - kv_idx).astype(score.dtype)

  return score_mod


def soft_cap(cap: float) -> ScoreMod:
  """cap * tanh(score / cap), the same as attn_logits_soft_cap."""
  def score_mod(score, batch, head, q_idx, kv_idx):
    return cap * jnp.tanh(score / cap)

  return score_mod


def relative_bias(table: jax.Array, max_distance: int) -> ScoreMod:
  """score + table[head, clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance].

  table: [num_heads, 2 * max_distance + 1], e.g. a learned parameter.
  """
  if table.ndim != 2 or table.shape[1] != 2 * max_distance + 1:
    raise ValueError(f"relative_bias table must be [num_heads, {2 * max_distance + 1}], got {table.shape}")

  def score_mod(score, batch, head, q_idx, kv_idx):
    distance = jnp.clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance
    return score + table[head, distance].astype(score.dtype)

  return score_mod


def document_mask(document_ids: jax.Array) -> MaskMod:
  """Tokens attend only within their document; document_ids [batch, length] by position."""
  def mask_mod(batch, head, q_idx, kv_idx):
    return document_ids[batch, q_idx] == document_ids[batch, kv_idx]

  return mask_mod


def prefix_lm(prefix_lengths: jax.Array) -> MaskMod:
  """Prefix-LM: every query sees the first prefix_lengths[batch] tokens, the
  rest causally. It carries its own causality, so use it with
  attention_type='full' (a 'global' layer would still hide the prefix's
  future part)."""
  def mask_mod(batch, head, q_idx, kv_idx):
    return (kv_idx < prefix_lengths[batch]) | (kv_idx <= q_idx)

  return mask_mod
