"""Symmetric KV quantization (int8 / int4) with per-token scales.

`kv_quant_axis` picks what one scale covers:
  dkv:            one scale per token per kv head (reduced over head_dim);
  heads_and_dkv:  one scale per token (reduced over kv heads and head_dim).
Values are round(x / scale) with scale = max|x| / qmax, so the largest
entry maps to +-qmax exactly; a zero vector gets scale 1 (not 0) to keep
dequantization finite. Scales are stored in float32.

Outlier channels: real LLM keys have a few channels far larger than the
rest, and one large channel sets the scale of its whole token, so every other
channel of that token is quantized coarsely (at 20x one input feature, int8
decode errs 4.5% and int4 72% of the output's max). The layer therefore works
in a rotated basis whenever the cache is quantized: q, k and v are multiplied
by one fixed orthogonal matrix R [H, H] (a normalised Walsh-Hadamard matrix,
or a seeded random orthogonal one when head_dim is not a power of two) before
the step, and the context by R^T after it. q.R.(k.R)^T = q.k^T, so the
logits, the softmax and every kernel are untouched, while each rotated
channel mixes all the originals and the outlier's energy spreads over the
whole token (QuaRot's idea, applied to the KV cache only). `insert` converts
between a rotated (quantized) and a plain cache.

Why not aqtp here: aqtp's strength is quantized matmuls with calibration
and gradient support (training); a KV cache needs only store-time
quantization and a per-block dequantize on read, which is these few lines,
and keeping them plain lets every kernel (Pallas included) read the same
layout.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import functools

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.configs import vocabulary as vocab
from meshattn.configs.vocabulary import KV_QUANT_AXES  # noqa: F401  (re-exported)

# kv_quant_dtype -> (storage dtype, largest magnitude stored)
KV_QUANT_DTYPES = {name: (getattr(jnp, name), qmax) for name, qmax in vocab.KV_QUANT_QMAX.items()}


@dataclasses.dataclass(frozen=True)
class KVQuant:
  """How the cache stores K/V: `dtype` in {int8, int4}, `axis` in KV_QUANT_AXES."""

  dtype: Literal["int8", "int4"] = "int8"
  axis: Literal["dkv", "heads_and_dkv"] = "dkv"

  def __post_init__(self):
    if self.dtype not in KV_QUANT_DTYPES:
      raise ValueError(f"kv_quant_dtype={self.dtype!r}: allowed {tuple(KV_QUANT_DTYPES)}")
    if self.axis not in KV_QUANT_AXES:
      raise ValueError(f"kv_quant_axis={self.axis!r}: allowed {KV_QUANT_AXES}")

  @property
  def storage_dtype(self):
    return KV_QUANT_DTYPES[self.dtype][0]

  @property
  def qmax(self) -> int:
    return KV_QUANT_DTYPES[self.dtype][1]

  @property
  def bits(self) -> int:
    return 8 if self.dtype == "int8" else 4

  def scale_shape(self, kv_heads: int) -> int:
    """Size of the scale's heads dimension: kv_heads (dkv) or 1 (heads_and_dkv)."""
    return kv_heads if self.axis == "dkv" else 1


def quantize(x: jax.Array, quant: KVQuant) -> tuple[jax.Array, jax.Array]:
  """x [B, S, K, H] -> (values [B, S, K, H] int, scales [B, S, K or 1] float32)."""
  reduce_axes = (-1,) if quant.axis == "dkv" else (-2, -1)
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=reduce_axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / quant.qmax, 1.0)  # [B, S, K or 1, 1]
  q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -quant.qmax, quant.qmax)
  scale = scale[..., 0] if quant.axis == "dkv" else scale[..., 0, 0][..., None]  # [B, S, K or 1]
  return q.astype(quant.storage_dtype), scale


def scales_by_head(scales: jax.Array) -> jax.Array:
  """Token-major scales [B, S, K or 1] (as `quantize` returns them) -> [B, K or 1, S].

  The contiguous cache stores this layout: each head's scales lie contiguous
  over the tokens, as the ragged decode kernels read them (one copy per tile,
  no transpose per step).
  """
  return jnp.swapaxes(scales, -1, -2)


def scales_by_token(scales: jax.Array) -> jax.Array:
  """Head-major scales [B, K or 1, S] (as the contiguous cache stores them) -> [B, S, K or 1],
  the layout `dequantize` takes; the inverse of `scales_by_head`."""
  return jnp.swapaxes(scales, -1, -2)


def dequantize(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
  """values [B, S, K, H], scales [B, S, K or 1] -> [B, S, K, H] in dtype."""
  return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


@functools.cache
def rotation(head_dim: int) -> np.ndarray:
  """The fixed orthogonal R [H, H] of the quantized cache's basis (float64, see module doc)."""
  if head_dim & (head_dim - 1) == 0:  # a power of two: Sylvester's Hadamard matrix
    r = np.ones((1, 1))
    while r.shape[0] < head_dim:
      r = np.block([[r, r], [r, -r]])
    return r / np.sqrt(head_dim)
  q, upper = np.linalg.qr(np.random.default_rng(0).standard_normal((head_dim, head_dim)))
  return q * np.sign(np.diag(upper))  # the sign fix makes the factorisation unique


def to_cache_basis(x: jax.Array, quant: KVQuant | None) -> jax.Array:
  """x [..., H] in the basis a cache with `quant` stores (rotated iff quantized)."""
  if quant is None:
    return x
  r = jnp.asarray(rotation(x.shape[-1]), jnp.float32)  # [H, H]
  return jnp.einsum("...h,hg->...g", x.astype(jnp.float32), r).astype(x.dtype)


def from_cache_basis(x: jax.Array, quant: KVQuant | None) -> jax.Array:
  """The inverse of `to_cache_basis` (R is orthogonal: multiply by R^T)."""
  if quant is None:
    return x
  r = jnp.asarray(rotation(x.shape[-1]), jnp.float32)  # [H, H]
  return jnp.einsum("...g,hg->...h", x.astype(jnp.float32), r).astype(x.dtype)
