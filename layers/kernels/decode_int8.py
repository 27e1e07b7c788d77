"""Two-term int8 operands for the GPU decode kernels' int8 tensor-core dots.

int8 K/V under a 16-bit float query run q.k and p.v as int8 x int8 -> int32
dots (`decode_common.gpu_tile_update`). The float operand of each dot (q,
once per program; p * v_scale, once per tile) is written against a per-row
scale s as two int8 terms, x ~= s * (hi + lo / 254), so each dot is two
exact integer dots and the operand keeps ~16 bits against its row's largest
entry -- more than the 8 significant bits of the bfloat16 path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Int8Query(NamedTuple):
  """A [Gp, H] query as two int8 terms: q ~= scale * (hi + lo / INT8_LO_RADIX), per row."""
  hi: jax.Array  # [Gp, H] int8
  lo: jax.Array  # [Gp, H] int8
  scale: jax.Array  # [Gp, 1] float32


# The low term's weight: hi + lo / 254 with |lo| <= 127 covers the rounding
# residual of hi (|y - hi| <= 1/2) to within 1/508 of a hi step.
INT8_LO_RADIX = 254.0


def split_int8(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """y float32 in [-127, 127] -> (hi, lo) int8 with |y - (hi + lo / 254)| <= 1/508."""
  hi = jnp.floor(y + 0.5)  # round to nearest: |y - hi| <= 1/2, |hi| <= 127
  lo = jnp.floor((y - hi) * INT8_LO_RADIX + 0.5)  # |lo| <= 127
  return hi.astype(jnp.int32).astype(jnp.int8), lo.astype(jnp.int32).astype(jnp.int8)


def rows_to_int8(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [R, C] float -> (hi, lo int8 [R, C], scale [R, 1] float32), x ~= scale * (hi + lo / 254).

  Per-row symmetric scale max|x| / 127, so every element is within
  max|x| / (127 * 508) ~ 1.6e-5 max|x| of the original. A row whose largest
  entry is below 127 x the smallest normal float32 (1.5e-36: zero, or far
  below anything a softmax keeps) becomes zeros with scale 1: its scale
  would be subnormal, which XLA and GPUs flush to zero.
  """
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [R, 1]
  live = amax >= 127.0 * float(jnp.finfo(jnp.float32).tiny)
  inv = jnp.where(live, 1.0 / jnp.where(live, amax, 1.0), 0.0)  # [R, 1], finite
  hi, lo = split_int8((x * inv) * 127.0)  # x * inv in [-1, 1]: no overflow
  return hi, lo, jnp.where(live, amax * (1.0 / 127.0), 1.0)


def int8_query(q: jax.Array) -> Int8Query:
  """q [Gp, H] (bfloat16 / float16) -> its two-term int8 form, once per program."""
  return Int8Query(*rows_to_int8(q))


def uses_int8_dots(query_dtype, key_dtype, value_dtype) -> bool:
  """Whether the GPU decode kernels run both dots on int8 tensor cores (see gpu_tile_update).

  int8 K and V under a 16-bit float query: the two int8 terms of q and of p
  hold ~16 bits against their row's largest entry, more than the 8
  significant bits the bfloat16 path rounds p to. A
  float32 query keeps float32 dots (its precision is the point of asking).
  """
  return (jnp.dtype(key_dtype) == jnp.int8 and jnp.dtype(value_dtype) == jnp.int8
          and jnp.dtype(query_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def int8_pair_dot(hi, lo, rhs, dims):
  """(hi + lo / 254) . rhs as two exact int8 x int8 -> int32 dots, in float32."""
  a = lax.dot_general(hi, rhs, dims, preferred_element_type=jnp.int32)
  b = lax.dot_general(lo, rhs, dims, preferred_element_type=jnp.int32)
  return a.astype(jnp.float32) + b.astype(jnp.float32) * (1.0 / INT8_LO_RADIX)
