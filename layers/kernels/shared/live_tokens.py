"""Which queries and keys take part in a masked call: shared by the kernels that cannot
hide a token themselves (splash, the Pallas GPU flash kernel), which zero the q / k / v
of tokens no real pair uses before the call (a select, as in online_softmax.py)."""

from __future__ import annotations

import jax
import numpy as np

from meshattn.layers.masks import MaskSpec, segment_mask, structural_mask


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
