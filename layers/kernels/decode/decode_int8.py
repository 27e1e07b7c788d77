"""Two-term int8 operands for the GPU decode kernels' int8 p.v dot.

With int8 V under a 16-bit float query, `decode_common.gpu_tile_update` runs
p.v as int8 x int8 -> int32 dots on the V tile as loaded. The probabilities
(times the V scales) are written against a per-row scale s as two int8
terms, x ~= s * (hi + lo / 254), so the dot is two exact integer dots and p
keeps ~16 bits against its row's largest entry -- more than the 8
significant bits the bfloat16 path rounds it to. q.k stays a bfloat16 dot,
which is exact for int8 K: a per-row split of q would lose the small
channels of a query with outlier channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The low term's weight: hi + lo / 254 with |lo| <= 127 covers the rounding
# residual of hi (|y - hi| <= 1/2) to within 1/508 of a hi step.
INT8_LO_RADIX = 254.0


def split_int8(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """y float32 in [-127, 127] -> (hi, lo) int8 with |y - (hi + lo / 254)| <= 1/508."""
  hi = jnp.floor(y + 0.5)  # round to nearest: |y - hi| <= 1/2, |hi| <= 127
  lo = jnp.floor((y - hi) * INT8_LO_RADIX + 0.5)  # |lo| <= 127
  return hi.astype(jnp.int32).astype(jnp.int8), lo.astype(jnp.int32).astype(jnp.int8)


# Rows whose largest entry is outside [MIN_ROW_MAX, MAX_ROW_MAX] become zeros:
# below, the scale max / 127 would be subnormal (XLA and GPUs flush it to
# zero); above, 1 / max would be. p * v_scale stays inside: p <= 1 and
# v_scale = max|v| / 127 <= 2.7e36.
MIN_ROW_MAX = 127.0 * float(jnp.finfo(jnp.float32).tiny)  # 1.5e-36
MAX_ROW_MAX = 1.0 / float(jnp.finfo(jnp.float32).tiny)  # 8.5e37


def rows_to_int8(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [R, C] float -> (hi, lo int8 [R, C], scale [R, 1] float32), x ~= scale * (hi + lo / 254).

  Per-row symmetric scale max|x| / 127, so every element is within
  max|x| / (127 * 508) ~ 1.6e-5 max|x| of the original. A row whose largest
  entry is outside [MIN_ROW_MAX, MAX_ROW_MAX] (zero, or far below anything a
  softmax keeps) becomes zeros with scale 1.
  """
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [R, 1]
  live = (amax >= MIN_ROW_MAX) & (amax <= MAX_ROW_MAX)
  inv = jnp.where(live, 1.0 / jnp.where(live, amax, 1.0), 0.0)  # [R, 1], finite and normal
  hi, lo = split_int8((x * inv) * 127.0)  # x * inv in [-1, 1]: no overflow
  return hi, lo, jnp.where(live, amax * (1.0 / 127.0), 1.0)


# The K extent of an int8 tensor-core MMA (m16n8k32): a p.v dot over fewer
# keys per tile is not run on int8 (Triton miscompiled 16-key int8 dots on
# the H200: results far off the reference, docs/benchmarks.md 2026-11-29).
INT8_DOT_MIN_KEYS = 32


def uses_int8_pv(query_dtype, value_dtype, tile_keys: int) -> bool:
  """Whether the GPU decode kernels run p.v on int8 tensor cores (see gpu_tile_update).

  int8 V under a 16-bit float query, in tiles of at least INT8_DOT_MIN_KEYS
  keys. A float32 query keeps float32 dots (its precision is the point of
  asking); int4 V, and smaller tiles, are cast to the query dtype.
  """
  return (jnp.dtype(value_dtype) == jnp.int8
          and jnp.dtype(query_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and tile_keys >= INT8_DOT_MIN_KEYS)


def int8_pair_dot(hi, lo, rhs, dims):
  """(hi + lo / 254) . rhs as two exact int8 x int8 -> int32 dots, in float32."""
  a = lax.dot_general(hi, rhs, dims, preferred_element_type=jnp.int32)
  b = lax.dot_general(lo, rhs, dims, preferred_element_type=jnp.int32)
  return a.astype(jnp.float32) + b.astype(jnp.float32) * (1.0 / INT8_LO_RADIX)
