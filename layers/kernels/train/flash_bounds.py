"""Which tiles the Pallas GPU flash kernels visit, and which of them need no mask.

A kernel program owns one block of queries (forward, dq) or one block of keys
(dkv) and loops over blocks of the other side. For each program it runs
  * the blocks in [lo, hi): every block holding a pair the mask may allow
    (the others are never loaded), and inside it
  * the interior [a, c): blocks where the mask allows every pair, computed
    without the per-element mask (lo <= a <= c <= hi; the rest are edge tiles).
Two sources bound those ranges and are intersected (`loop_ranges`):
  * structural (causal / window / chunk): closed-form functions of the block
    index, evaluated inside the kernels (positions are token indices there);
  * data (segment ids; key positions < 0 in the full mask, which has no
    index-position guarantee): int32 arrays [B, num_blocks * 4] of
    (lo, hi, a, c) built here in plain JAX before the pallas_call.

Segment ranges hold for arbitrary ids (not only contiguous packing): for
every query, the first and last key of its segment come from a stable
argsort of the key ids and two binary searches (O(S log S), never [T, S]);
segment 0 attends nowhere (an empty range). A block takes the union of its
rows' ranges. The segment interior of a query block whose rows all share one
segment u is the first run of consecutive key blocks whose keys all have id
u (and symmetrically for a key block); other tiles of u keep the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from meshattn.layers.masks import MaskSpec


def _cdiv(a, b):
  return lax.div(a + b - 1, b)  # a >= 0, so truncating division is floor


# ---- Structural bounds (token-index positions; scalar or vector block indices) ----------


def kv_block_range(spec: MaskSpec, block_q: int, block_kv: int, q_block, num_kv_blocks: int):
  """[lo, hi) key blocks that a query block can see."""
  first_q = q_block * block_q
  last_q = first_q + block_q - 1
  if not spec.is_causal:
    return 0, num_kv_blocks
  hi = jnp.minimum(lax.div(last_q, block_kv) + 1, num_kv_blocks)
  if spec.window:
    lo = lax.div(jnp.maximum(first_q - spec.window + 1, 0), block_kv)
  elif spec.chunk:
    lo = lax.div(lax.div(first_q, spec.chunk) * spec.chunk, block_kv)
  else:
    lo = 0
  return lo, hi


def kv_block_interior(spec: MaskSpec, block_q: int, block_kv: int, q_block, full_kv_blocks: int):
  """[a, c) key blocks whose every key every query of the block may see.

  full_kv_blocks: the leading key blocks without padding (kv_len // block_kv).
  """
  first_q = q_block * block_q
  last_q = first_q + block_q - 1
  if not spec.is_causal:
    return 0, full_kv_blocks  # key positions < 0 come from the data bounds
  # The last key of the tile must not be after the first query.
  hi = jnp.minimum(lax.div(first_q + 1, block_kv), full_kv_blocks)
  if spec.window:
    # The last query must still see the first key: k >= last_q - window + 1.
    lo = _cdiv(jnp.maximum(last_q - spec.window + 1, 0), block_kv)
  elif spec.chunk:
    chunk = lax.div(first_q, spec.chunk)
    lo = _cdiv(chunk * spec.chunk, block_kv)
    # A query block spanning two chunks has no tile that both chunks see whole.
    lo = jnp.where(chunk == lax.div(last_q, spec.chunk), lo, hi)
  else:
    lo = 0
  return lo, hi


def q_block_range(spec: MaskSpec, block_q: int, block_kv: int, kv_block, num_q_blocks: int):
  """[lo, hi) query blocks that can see a key block."""
  first_k = kv_block * block_kv
  last_k = first_k + block_kv - 1
  if not spec.is_causal:
    return 0, num_q_blocks
  lo = lax.div(first_k, block_q)
  if spec.window:
    hi = jnp.minimum(lax.div(last_k + spec.window - 1, block_q) + 1, num_q_blocks)
  elif spec.chunk:
    last_q = (lax.div(last_k, spec.chunk) + 1) * spec.chunk - 1
    hi = jnp.minimum(lax.div(last_q, block_q) + 1, num_q_blocks)
  else:
    hi = num_q_blocks
  return lo, hi


def q_block_interior(spec: MaskSpec, block_q: int, block_kv: int, kv_block, num_q_blocks: int,
                     full_kv_blocks: int):
  """[a, c) query blocks whose every query may see every key of the key block."""
  if not spec.is_causal:
    return 0, num_q_blocks
  first_k = kv_block * block_kv
  last_k = first_k + block_kv - 1
  # The first query of the block must not be before the last key.
  lo = _cdiv(last_k, block_q)
  if spec.window:
    # The last query must still see the first key: q <= first_k + window - 1.
    hi = jnp.minimum(lax.div(first_k + spec.window, block_q), num_q_blocks)
  elif spec.chunk:
    chunk = lax.div(first_k, spec.chunk)
    hi = jnp.minimum(lax.div((chunk + 1) * spec.chunk, block_q), num_q_blocks)
    hi = jnp.where(chunk == lax.div(last_k, spec.chunk), hi, lo)
  else:
    hi = num_q_blocks
  # A key block holding padding (position -1) is never mask-free.
  hi = jnp.where(kv_block < full_kv_blocks, hi, lo)
  return lo, hi


def loop_ranges(struct_range, struct_interior, data=None):
  """(lo, a, c, hi) with lo <= a <= c <= hi: visit [lo, hi), [a, c) without the mask.

  data: (lo, hi, a, c) from the data bounds arrays, intersected with the
  structural ones; an empty intersection visits nothing.
  """
  (lo, hi), (a, c) = struct_range, struct_interior
  if data is not None:
    lo, hi = jnp.maximum(lo, data[0]), jnp.minimum(hi, data[1])
    a, c = jnp.maximum(a, data[2]), jnp.minimum(c, data[3])
  hi = jnp.maximum(hi, lo)
  a = jnp.minimum(jnp.maximum(a, lo), hi)
  c = jnp.minimum(jnp.maximum(c, a), hi)
  return lo, a, c, hi


# ---- Data bounds (wrapper side, plain JAX) -----------------------------------------------


class SegmentRanges(NamedTuple):
  """Token-level segment ranges: which keys share each query's segment and vice versa."""

  kv_lo: jax.Array  # [B, T] first key with the query's segment (S if none)
  kv_hi: jax.Array  # [B, T] last such key + 1 (0 if none)
  q_lo: jax.Array  # [B, S] first query with the key's segment (T if none)
  q_hi: jax.Array  # [B, S] last such query + 1 (0 if none)


def _occurrence_range(needles, haystack):
  """For each needle [first, last + 1) of its value in haystack; (len, 0) if absent or 0."""
  n = haystack.shape[0]
  order = jnp.argsort(haystack, stable=True)  # equal ids keep index order
  ids = haystack[order]  # [n] sorted
  # Unrolled binary search: XLA fuses its log2(n) gather steps into one kernel.
  left = jnp.searchsorted(ids, needles, side="left", method="scan_unrolled")  # [m]
  right = jnp.searchsorted(ids, needles, side="right", method="scan_unrolled")  # [m]
  found = (right > left) & (needles != 0)
  first = order[jnp.minimum(left, n - 1)]
  last = order[jnp.maximum(right - 1, 0)]
  return jnp.where(found, first, n), jnp.where(found, last + 1, 0)


def segment_ranges(q_seg: jax.Array, kv_seg: jax.Array, same: bool = False) -> SegmentRanges:
  """Ranges for segment ids q_seg [B, T], kv_seg [B, S] (padded entries hold 0).

  same: q_seg and kv_seg are one array (self-attention): one sort serves both sides.
  """
  kv_lo, kv_hi = jax.vmap(_occurrence_range)(q_seg, kv_seg)  # [B, T]
  q_lo, q_hi = (kv_lo, kv_hi) if same else jax.vmap(_occurrence_range)(kv_seg, q_seg)  # [B, S]
  return SegmentRanges(*(x.astype(jnp.int32) for x in (kv_lo, kv_hi, q_lo, q_hi)))


def _block_union(lo, hi, block: int, other_block: int):
  """Token ranges [B, L] -> per block of `block` rows the union in blocks of `other_block`."""
  batch = lo.shape[0]
  lo = lo.reshape(batch, -1, block).min(-1)  # [B, L / block]
  hi = hi.reshape(batch, -1, block).max(-1)  # [B, L / block]
  empty = hi <= lo
  return jnp.where(empty, 0, lo // other_block), jnp.where(empty, 0, -(-hi // other_block))


def _uniform_ids(seg, block: int, sentinel: int):
  """[B, L / block]: the id shared by every row of the block, else sentinel (< 0)."""
  tiles = seg.reshape(seg.shape[0], -1, block)  # [B, n, block]
  first = tiles[..., 0]  # [B, n]
  uniform = jnp.all(tiles == first[..., None], axis=-1) & (first != 0)
  return jnp.where(uniform, first, sentinel)


def _first_run(u_self, u_other):
  """Per block of one row: the first run of blocks of the other side uniform in its id."""
  n = u_other.shape[0]
  order = jnp.argsort(u_other, stable=True)
  ids = u_other[order]
  left = jnp.searchsorted(ids, u_self, side="left")  # [m]
  start = order[jnp.minimum(left, n - 1)]  # [m] first block with the id (if any)
  found = (left < n) & (ids[jnp.minimum(left, n - 1)] == u_self) & (u_self > 0)
  # run_end[j]: one past the last block of the run of equal ids holding j.
  idx = jnp.arange(n)
  last_of_run = jnp.append(u_other[1:] != u_other[:-1], True)  # [n]
  run_end = lax.cummin(jnp.where(last_of_run, idx, n), axis=0, reverse=True) + 1  # [n]
  return jnp.where(found, start, 0), jnp.where(found, run_end[start], 0)


def _pack(lo, hi, a, c):
  """(lo, hi, a, c) [B, n] each -> [B, n * 4] int32 (one 4-wide block per kernel program)."""
  shape = jnp.broadcast_shapes(*(x.shape for x in (lo, hi, a, c)))
  out = jnp.stack([jnp.broadcast_to(x, shape) for x in (lo, hi, a, c)], axis=-1)  # [B, n, 4]
  return out.reshape(shape[0], -1).astype(jnp.int32)


def _valid_kv_blocks(kv_pos, block_kv: int):
  """[B, S / block_kv]: every key of the block has a position >= 0."""
  return jnp.all(kv_pos.reshape(kv_pos.shape[0], -1, block_kv) >= 0, axis=-1)


def kv_data_bounds(spec: MaskSpec, block_q: int, block_kv: int, num_q_blocks: int, kv_pos,
                   q_seg=None, kv_seg=None, ranges: SegmentRanges | None = None):
  """[B, num_q_blocks * 4] (lo, hi, a, c) in key blocks per query block (forward, dq).

  None when the structural bounds are all there is (no segment ids, causal kinds).
  """
  full = not spec.is_causal
  if ranges is None and not full:
    return None
  batch, num_kv = kv_pos.shape[0], kv_pos.shape[1] // block_kv
  if ranges is not None:
    lo, hi = _block_union(ranges.kv_lo, ranges.kv_hi, block_q, block_kv)  # [B, nq]
    a, c = jax.vmap(_first_run)(_uniform_ids(q_seg, block_q, -1),
                                _uniform_ids(kv_seg, block_kv, -2))  # [B, nq]
  else:
    lo = a = jnp.zeros((batch, num_q_blocks), jnp.int32)
    hi = c = jnp.full((batch, num_q_blocks), num_kv, jnp.int32)
  if full:
    # The full mask only drops keys at positions < 0: the leading all-valid blocks are interior.
    leading = jnp.sum(jnp.cumprod(_valid_kv_blocks(kv_pos, block_kv), axis=-1), axis=-1)  # [B]
    c = jnp.minimum(c, leading[:, None])
  return _pack(lo, hi, a, c)


def q_data_bounds(spec: MaskSpec, block_q: int, block_kv: int, num_q_blocks: int, kv_pos,
                  q_seg=None, kv_seg=None, ranges: SegmentRanges | None = None):
  """[B, (S / block_kv) * 4] (lo, hi, a, c) in query blocks per key block (dkv), or None."""
  full = not spec.is_causal
  if ranges is None and not full:
    return None
  batch, num_kv = kv_pos.shape[0], kv_pos.shape[1] // block_kv
  if ranges is not None:
    lo, hi = _block_union(ranges.q_lo, ranges.q_hi, block_kv, block_q)  # [B, nkv]
    a, c = jax.vmap(_first_run)(_uniform_ids(kv_seg, block_kv, -2),
                                _uniform_ids(q_seg, block_q, -1))  # [B, nkv]
  else:
    lo = a = jnp.zeros((batch, num_kv), jnp.int32)
    hi = c = jnp.full((batch, num_kv), num_q_blocks, jnp.int32)
  if full:
    c = jnp.where(_valid_kv_blocks(kv_pos, block_kv), c, 0)  # a block with an empty slot is edge
  return _pack(lo, hi, a, c)
