"""The GPU decode kernels' int8 tensor-core path: two-term int8 operands, exact int32 dots.

int8 K/V under a bfloat16 query run q.k and p.v as int8 x int8 dots, with q
and p * v_scale each split into hi + lo / 254 against a per-row scale. These
tests pin the split's error bound, which inputs take the path, and that the
kernel on that path is as close to float64 attention as its bfloat16 output
can be (the bfloat16-dot path, which rounds p to bfloat16 before p.v, was
not).
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from meshattn.kvcache.quant import KVQuant, quantize
from meshattn.layers.kernels import decode_common as dc
from meshattn.layers.kernels import decode_int8
from meshattn.layers.kernels.ragged import ragged_decode_pallas, ragged_visible
from helpers.decode_inputs import attention_np


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, (4, 24), elements=st.floats(-1e4, 1e4, width=32)))
def test_rows_to_int8_error_bound(x):
  """|x - s (hi + lo / 254)| <= s / 508 (+ float32 rounding) per row, |hi|, |lo| <= 127; rows
  whose scale would be subnormal (max|x| < 127 x the smallest normal) become zeros, scale 1."""
  hi, lo, s = (np.asarray(a) for a in decode_int8.rows_to_int8(jnp.asarray(x)))
  assert hi.dtype == lo.dtype == np.int8
  assert np.abs(hi.astype(int)).max() <= 127 and np.abs(lo.astype(int)).max() <= 127
  approx = s * (hi.astype(np.float64) + lo.astype(np.float64) / 254)
  amax = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
  dead = amax < 127 * np.finfo(np.float32).tiny
  bound = np.where(dead, amax, s / 508 * (1 + 1e-5) + 1e-6 * amax)
  assert np.all(np.abs(approx - x) <= bound)
  assert np.all(s[dead[:, 0]] == 1.0) and np.all(hi[dead[:, 0]] == 0) and np.all(lo[dead[:, 0]] == 0)


def test_which_inputs_use_int8_dots():
  """int8 K and V under a 16-bit float query only: float32 queries keep float32 dots, int4 and
  float caches keep the cast-to-query path."""
  assert decode_int8.uses_int8_dots(jnp.bfloat16, jnp.int8, jnp.int8)
  assert decode_int8.uses_int8_dots(jnp.float16, jnp.int8, jnp.int8)
  assert not decode_int8.uses_int8_dots(jnp.float32, jnp.int8, jnp.int8)
  assert not decode_int8.uses_int8_dots(jnp.bfloat16, jnp.int4, jnp.int4)
  assert not decode_int8.uses_int8_dots(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)


def test_tile_update_int8_dots_match_float64():
  """One online-softmax step on the int8 path (float32 carry) against float64. The two-term
  query is within 1.6e-5 of its row maximum, which moves logits of ~10 by ~1e-4 and so the
  output by ~1e-4 relative: over an order of magnitude inside bfloat16's rounding (up to
  2^-8 = 3.9e-3)."""
  rng = np.random.default_rng(3)
  gp, h, bk, scale = 16, 32, 64, 0.2
  q = jnp.asarray(rng.normal(size=(gp, h)), jnp.bfloat16)
  k = jnp.asarray(rng.integers(-127, 128, size=(bk, h)), jnp.int8)
  v = jnp.asarray(rng.integers(-127, 128, size=(bk, h)), jnp.int8)
  ks = jnp.asarray(np.exp(rng.uniform(-6, -3, size=(1, bk))), jnp.float32)
  vs = jnp.asarray(np.exp(rng.uniform(-6, -3, size=(1, bk))), jnp.float32)
  valid = np.arange(bk) < 50  # a partial tile: masked keys are zeros, as loaded
  k = jnp.where(valid[:, None], k, 0)
  v = jnp.where(valid[:, None], v, 0)
  carry = dc.initial_carry(None, gp, h)
  m, l, acc = dc.gpu_tile_update(carry, decode_int8.int8_query(q), k, v, jnp.asarray(valid[:, None]),
                                 jnp.asarray(valid[None, :]), ks * valid, vs * valid,
                                 scale=scale, soft_cap=None)
  q64 = np.asarray(q, np.float64)
  k64 = np.asarray(k, np.float64) * np.asarray(ks, np.float64).T  # [bk, h]
  v64 = np.asarray(v, np.float64) * np.asarray(vs, np.float64).T
  logits = np.where(valid[None, :], q64 @ k64.T * scale, -np.inf)
  m64 = logits.max(axis=1, keepdims=True)
  p = np.exp(logits - m64)
  expected = (p @ v64) / p.sum(axis=1, keepdims=True)
  got = np.asarray(acc, np.float64) / np.asarray(l, np.float64)
  assert np.abs(np.asarray(m) - m64).max() < 5e-5 * np.abs(m64).max()
  err = np.abs(got - expected).max() / np.abs(expected).max()
  assert err < 5e-4, err


@pytest.mark.parametrize("num_splits", [1, 3])
def test_ragged_int8_dots_beat_bfloat16_rounding(num_splits):
  """The kernel (interpret mode) with a bfloat16 query over int8 K/V: every output is within
  one bfloat16 rounding of float64 attention over the dequantized cache."""
  rng = np.random.default_rng(5)
  batch, heads, kv_heads, cap, h = 4, 8, 2, 96, 32
  lengths = jnp.asarray([96, 1, 50, 77], jnp.int32)
  q = jnp.asarray(rng.normal(size=(batch, heads, h)), jnp.bfloat16)
  quant = KVQuant("int8")
  k, ks = quantize(jnp.asarray(rng.normal(size=(batch, cap, kv_heads, h))), quant)
  v, vs = quantize(jnp.asarray(rng.normal(size=(batch, cap, kv_heads, h))), quant)
  out = ragged_decode_pallas(q, k, v, lengths, scale=h ** -0.5, key_scale=ks, value_scale=vs,
                             block_kv=16, num_splits=num_splits, interpret=True)
  deq = lambda x, s: np.asarray(x, np.float64) * np.asarray(s, np.float64)[..., None]
  visible = np.asarray(ragged_visible(lengths, cap, None))
  expected = attention_np(np.asarray(q, np.float64), deq(k, ks), deq(v, vs), visible,
                          scale=h ** -0.5)
  got = np.asarray(out, np.float64)
  # bfloat16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of itself. The
  # int8 path adds ~1e-5 of the row's largest output on top (the bfloat16-dot path, which
  # rounds p to bfloat16 before p.v, added ~2e-3 here).
  row_max = np.abs(expected).max(axis=-1, keepdims=True)
  np.testing.assert_array_less(np.abs(got - expected), 2.0 ** -8 * np.abs(expected) + 2e-4 * row_max)
