"""Attention masks.

Two kinds live here:

* `MaskSpec`: the structural mask of an attention pattern (causal, full,
  sliding window, chunked), typed so that a window cannot exist without its
  size. Kernels build the boolean mask from token *positions*, so the same
  spec serves training (positions = token index, or in packed rows each
  token's index in its packed sequence: `packed_mask_inputs`) and decoding
  against a cache (positions = where each cached token sits in its sequence).
* Flax-compatible helpers (`make_attention_mask`, `make_causal_mask`,
  `combine_masks`) for user masks of shape [batch..., heads, q_len, kv_len].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from meshattn.configs import vocabulary as vocab
from meshattn.configs.vocabulary import ATTENTION_TYPES  # noqa: F401  (re-exported)

AttentionType = Literal["global", "local_sliding", "chunk", "full"]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The structural mask of one attention layer.

  attention_type:
    global: causal, key position <= query position.
    local_sliding: causal and query_pos - key_pos < window: the query at t
      sees keys t-window+1 .. t, exactly `window` keys (itself included).
    chunk: causal and both in the same `chunk`-token chunk
      (key_pos // chunk == query_pos // chunk), as in Llama 4.
    full: bidirectional, every key.

  `window` is kept only for local_sliding and `chunk` only for chunk (None otherwise), so
  readers test `spec.window` / `spec.chunk` / `spec.is_causal` instead of the kind's name,
  and two specs of one pattern are equal.
  """

  attention_type: AttentionType = "global"
  window: int | None = None
  chunk: int | None = None

  def __post_init__(self):
    if self.attention_type not in ATTENTION_TYPES:
      raise ValueError(
          f"attention_type={self.attention_type!r}: allowed {ATTENTION_TYPES}")
    size = self.chunk if self.attention_type == "chunk" else self.window
    problem = vocab.mask_size_problem(self.attention_type, size)
    if problem:
      raise ValueError(f"{'chunk' if self.attention_type == 'chunk' else 'window'} "
                       f"({vocab.MASK_SIZE_KEYS[self.attention_type]}) {problem}")
    if self.attention_type != "local_sliding":
      object.__setattr__(self, "window", None)  # a size the kind does not use is not kept
    if self.attention_type != "chunk":
      object.__setattr__(self, "chunk", None)

  @property
  def is_causal(self) -> bool:
    """Keys at or before the query only (every kind but full)."""
    return self.attention_type != "full"

  @property
  def plain_causal(self) -> bool:
    """Causal and nothing else: no window, no chunk (the global kind)."""
    return self.is_causal and self.window is None and self.chunk is None


def structural_mask(spec: MaskSpec, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
  """Boolean mask [B, T, S] from query positions [B, T] and key positions [B, S].

  A key position < 0 marks an empty slot (an unwritten cache entry) and is
  never attended.
  """
  q = q_pos[:, :, None]  # [B, T, 1]
  k = kv_pos[:, None, :]  # [B, 1, S]
  mask = k >= 0  # [B, 1, S]
  if spec.is_causal:
    mask = mask & (k <= q)
  if spec.window:
    mask = mask & (q - k < spec.window)
  elif spec.chunk:
    mask = mask & (q // spec.chunk == k // spec.chunk)
  return jnp.broadcast_to(mask, (q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]))


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """Packing mask [B, T, S]: same segment, and segment 0 (padding) sees nothing."""
  q = q_segment_ids[:, :, None]  # [B, T, 1]
  k = kv_segment_ids[:, None, :]  # [B, 1, S]
  return (q == k) & (q != 0)


# ---- Packed rows ------------------------------------------------------------------
# A packed row holds several sequences, each a contiguous run of one segment id
# (0 = padding), the layout packing produces. Each sequence must get the mask it
# has alone: causal, window and full masks depend only on differences of
# positions within a segment, so token indices serve them, but chunk boundaries
# count from the sequence's first token, not from the row's.


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Each token's index in its packed sequence: [B, L] int32 from segment ids [B, L].

  A sequence is a run of equal ids; a run restarts the count, also when its id
  appeared earlier in the row (ids are expected to be contiguous runs).
  """
  length = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)  # [B, L]
  starts = jnp.concatenate(
      [jnp.ones(segment_ids.shape[:-1] + (1,), bool),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)  # [B, L] a run's first token
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)  # [B, L]
  return idx - first


def chunk_segment_ids(segment_ids: jax.Array, chunk: int) -> jax.Array:
  """Ids [B, L] int32 of the pieces a chunk mask cuts packed sequences into (0 stays padding).

  A piece is `chunk` tokens of one sequence counted from its first token (the
  last piece may be shorter); pieces are numbered 1, 2, ... along the row. A
  chunk mask over packed rows is the causal mask within pieces, which kernels
  that mask by token index (flash) express as causal + these segment ids.
  """
  pieces = segment_positions(segment_ids) % chunk == 0  # [B, L] a piece's first token
  ids = jnp.cumsum(pieces, axis=-1, dtype=jnp.int32)  # [B, L] >= 1
  return jnp.where(segment_ids != 0, ids, 0)


def packed_mask_inputs(spec: MaskSpec, segment_ids: jax.Array, *,
                       by_index: bool) -> tuple[MaskSpec, jax.Array, jax.Array]:
  """(mask spec, positions [B, L], segment ids [B, L]) for a train kernel doing self-attention
  over packed rows [B, L] (one ids array for queries and keys), so that each packed
  sequence gets exactly the mask it has alone.

  by_index: the kernel builds its structural mask from token indices, not from the
  positions it is given (registry `masks_by_index`, the "whole" length layout): it
  gets token indices, and a chunk mask becomes causal within `chunk_segment_ids`.
  Otherwise the kernel masks by the positions: each token's index in its sequence
  (which is also what score_mod / mask_mod hooks then see as q_idx / kv_idx).
  Computed on whole rows (before any shard_map), so shards split them like the ids.
  """
  if not by_index:
    return spec, segment_positions(segment_ids), segment_ids
  idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32),
                         segment_ids.shape)  # [B, L]
  if spec.attention_type == "chunk":
    return MaskSpec("global"), idx, chunk_segment_ids(segment_ids, spec.chunk)
  return spec, idx, segment_ids


# ---- Flax-compatible helpers ---------------------------------------------------


def make_attention_mask(
    query_input: jax.Array,
    key_input: jax.Array,
    pairwise_fn: Callable[[jax.Array, jax.Array], jax.Array] = jnp.multiply,
    extra_batch_dims: int = 0,
    dtype=jnp.float32,
) -> jax.Array:
  """Mask [batch..., 1, len_q, len_kv] from per-token inputs [batch..., len].

  `pairwise_fn(q[..., :, None], k[..., None, :])` decides each pair; the
  default multiplies, so non-zero (e.g. non-padding) tokens pair up.
  """
  mask = pairwise_fn(
      jnp.expand_dims(query_input, axis=-1), jnp.expand_dims(key_input, axis=-2))
  mask = jnp.expand_dims(mask, axis=-3)  # the heads axis
  mask = jnp.expand_dims(mask, axis=tuple(range(extra_batch_dims)))
  return mask.astype(dtype)


def make_causal_mask(x: jax.Array, extra_batch_dims: int = 0, dtype=jnp.float32) -> jax.Array:
  """Causal mask [batch..., 1, len, len] for inputs [batch..., len]."""
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(
      idxs, idxs, jnp.greater_equal, extra_batch_dims=extra_batch_dims, dtype=dtype)


def combine_masks(*masks: jax.Array | None, dtype=jnp.float32) -> jax.Array | None:
  """Logical AND of the given masks (None entries ignored); None if none given."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  ndims = {m.ndim for m in present}
  if len(ndims) != 1:
    raise ValueError(f"combine_masks: masks must have the same rank, got ranks {sorted(ndims)}")
  mask = present[0]
  for other in present[1:]:
    mask = jnp.logical_and(mask, other)
  return mask.astype(dtype)
