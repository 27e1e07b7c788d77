"""The GPU decode kernels' int8 p.v path: two-term int8 probabilities, exact int32 dots.

int8 V under a bfloat16 / float16 query runs p.v as int8 x int8 dots, with
p * v_scale split into hi + lo / 254 against a per-row scale; q.k stays an
exact 16-bit dot (int8 K cast to the query dtype). These tests pin the
split's error bound, which inputs take the path, and that the kernels on it
are as close to float64 attention as their 16-bit output can be -- for
queries with outlier channels too -- which the bfloat16-dot path (it rounds
p to bfloat16 before p.v) was not.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head
from meshattn.layers.kernels.decode import decode_common as dc
from meshattn.layers.kernels.decode import decode_int8
from meshattn.layers.kernels.decode.paged import gather_pages, paged_decode_pallas
from meshattn.layers.kernels.decode.ragged import ragged_decode_pallas, ragged_visible

from helpers.decode_inputs import attention_np, page_owners


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, (4, 24), elements=st.floats(-1e4, 1e4, width=32)))
def test_rows_to_int8_error_bound(x):
  """|x - s (hi + lo / 254)| <= s / 508 (+ float32 rounding) per row, |hi|, |lo| <= 127; rows
  whose scale would be subnormal (max|x| < MIN_ROW_MAX) become zeros with scale 1."""
  hi, lo, s = (np.asarray(a) for a in decode_int8.rows_to_int8(jnp.asarray(x)))
  assert hi.dtype == lo.dtype == np.int8
  assert np.abs(hi.astype(int)).max() <= 127 and np.abs(lo.astype(int)).max() <= 127
  approx = s * (hi.astype(np.float64) + lo.astype(np.float64) / 254)
  amax = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
  dead = amax < decode_int8.MIN_ROW_MAX
  bound = np.where(dead, amax, s / 508 * (1 + 1e-5) + 1e-6 * amax)
  assert np.all(np.abs(approx - x) <= bound)
  assert np.all(s[dead[:, 0]] == 1.0) and np.all(hi[dead[:, 0]] == 0) and np.all(lo[dead[:, 0]] == 0)


def test_rows_to_int8_extreme_rows():
  """Rows at the edges of the float32 range: the largest allowed maxima keep the bound, those
  past MAX_ROW_MAX (where 1 / max is subnormal) become zeros; never inf or NaN."""
  x = np.array([[decode_int8.MAX_ROW_MAX, -1.0, 3e36], [2 * decode_int8.MAX_ROW_MAX, 1.0, 0.0],
                [1e-30, -5e-31, 0.0]], np.float32)
  hi, lo, s = (np.asarray(a, np.float64) for a in decode_int8.rows_to_int8(jnp.asarray(x)))
  approx = s * (hi + lo / 254)
  assert np.all(np.isfinite(approx))
  assert np.all(np.abs(approx[[0, 2]] - x[[0, 2]]) <= s[[0, 2]] / 508 * (1 + 1e-5))
  assert np.all(approx[1] == 0) and s[1, 0] == 1.0


def test_which_inputs_use_int8_pv():
  """int8 V under a 16-bit float query only: float32 queries keep float32 dots, int4 and float
  caches keep the cast-to-query path."""
  assert decode_int8.uses_int8_pv(jnp.bfloat16, jnp.int8, 64)
  assert decode_int8.uses_int8_pv(jnp.float16, jnp.int8, 32)
  assert not decode_int8.uses_int8_pv(jnp.bfloat16, jnp.int8, 16)  # under the int8 MMA's K
  assert not decode_int8.uses_int8_pv(jnp.float32, jnp.int8, 64)
  assert not decode_int8.uses_int8_pv(jnp.bfloat16, jnp.int4, 64)
  assert not decode_int8.uses_int8_pv(jnp.bfloat16, jnp.bfloat16, 64)


@pytest.mark.parametrize("outlier", [None, 3000.0], ids=["plain", "outlier_channel"])
def test_tile_update_int8_pv_matches_float64(outlier):
  """One online-softmax step on the int8 path (float32 carry) against float64: q.k is exact, and
  the two-term p is within 1.6e-5 of its row maximum, so the output is within ~1e-5 -- far
  inside bfloat16's rounding (up to 2^-8 = 3.9e-3), with or without an outlier channel."""
  rng = np.random.default_rng(3)
  gp, h, bk, scale = 16, 32, 64, 0.2
  q = rng.normal(size=(gp, h))
  if outlier:
    q[:, 0] = outlier  # one huge channel: the small ones must keep their precision
  q = jnp.asarray(q, jnp.bfloat16)
  k = jnp.asarray(rng.integers(-127, 128, size=(bk, h)), jnp.int8)
  v = jnp.asarray(rng.integers(-127, 128, size=(bk, h)), jnp.int8)
  ks = jnp.asarray(np.exp(rng.uniform(-9, -6, size=(1, bk))), jnp.float32)
  vs = jnp.asarray(np.exp(rng.uniform(-6, -3, size=(1, bk))), jnp.float32)
  valid = np.arange(bk) < 50  # a partial tile: masked keys are zeros, as loaded
  k = jnp.where(valid[:, None], k, 0)
  v = jnp.where(valid[:, None], v, 0)
  carry = dc.initial_carry(None, gp, h)
  m, l, acc = dc.gpu_tile_update(carry, q, k, v, jnp.asarray(valid[:, None]),
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
  np.testing.assert_allclose(np.asarray(m), m64, rtol=1e-6, atol=1e-6)  # exact q.k, f32 sum
  err = np.abs(got - expected).max() / np.abs(expected).max()
  assert err < 5e-5, err


def _int8_cache(rng, batch, cap, kv_heads, h):
  quant = KVQuant("int8")
  k, ks = quantize(jnp.asarray(rng.normal(size=(batch, cap, kv_heads, h))), quant)
  v, vs = quantize(jnp.asarray(rng.normal(size=(batch, cap, kv_heads, h))), quant)
  return k, v, ks, vs


def _dequantized(x, s):
  return np.asarray(x, np.float64) * np.asarray(s, np.float64)[..., None]


def _assert_within_output_rounding(out, expected, dtype):
  """Every output within one rounding of out's 16-bit dtype of float64, plus 2e-4 of its row's
  largest output (the bfloat16-dot path added ~2e-3 of it here, from rounding p)."""
  got = np.asarray(out, np.float64)
  ulp = 2.0 ** -8 if dtype == jnp.bfloat16 else 2.0 ** -11  # half an ulp, relative
  row_max = np.abs(expected).max(axis=-1, keepdims=True)
  excess = np.abs(got - expected) - (ulp * np.abs(expected) + 2e-4 * row_max)
  assert np.all(excess <= 0), f"max excess {excess.max():.3e} of row max {row_max.max():.3e}"


RAGGED_CASES = [(1, jnp.bfloat16, None), (3, jnp.bfloat16, None), (3, jnp.float16, None),
                (1, jnp.bfloat16, 3000.0)]


@pytest.mark.parametrize("num_splits, dtype, outlier", RAGGED_CASES,
                         ids=["bf16", "bf16-split3", "f16-split3", "bf16-outlier_channel"])
def test_ragged_int8_pv_within_output_rounding(num_splits, dtype, outlier):
  """The ragged kernel (interpret mode) with a 16-bit query over int8 K/V, against float64
  attention over the dequantized cache; an outlier query channel (3000 against ~1) costs the
  other channels nothing, as q.k is exact."""
  rng = np.random.default_rng(5)
  batch, heads, kv_heads, cap, h = 4, 8, 2, 96, 32
  lengths = jnp.asarray([96, 1, 50, 77], jnp.int32)
  q = rng.normal(size=(batch, heads, h))
  scale = h ** -0.5
  if outlier:
    q[..., 0] = outlier
    scale = 1.0 / outlier  # keeps the logits O(10)
  q = jnp.asarray(q, dtype)
  k, v, ks, vs = _int8_cache(rng, batch, cap, kv_heads, h)
  out = ragged_decode_pallas(q, k, v, lengths, scale=scale, key_scale=scales_by_head(ks),
                             value_scale=scales_by_head(vs),
                             block_kv=32, num_splits=num_splits, interpret=True)
  visible = np.asarray(ragged_visible(lengths, cap, None))
  expected = attention_np(np.asarray(q, np.float64), _dequantized(k, ks), _dequantized(v, vs),
                          visible, scale=scale)
  _assert_within_output_rounding(out, expected, dtype)


def test_ragged_int8_16_key_tiles_take_the_cast_path():
  """16-key tiles are under the int8 MMA's K (32), so V is cast to the query dtype instead of
  running the int8 dot (on the GPU, Triton miscompiled those dots): the result stays within
  the bfloat16 path's error of float64 attention."""
  rng = np.random.default_rng(6)
  batch, heads, kv_heads, cap, h = 3, 8, 2, 40, 32
  lengths = jnp.asarray([40, 3, 17], jnp.int32)
  q = jnp.asarray(rng.normal(size=(batch, heads, h)), jnp.bfloat16)
  k, v, ks, vs = _int8_cache(rng, batch, cap, kv_heads, h)
  out = ragged_decode_pallas(q, k, v, lengths, scale=h ** -0.5, key_scale=scales_by_head(ks),
                             value_scale=scales_by_head(vs),
                             block_kv=16, num_splits=2, interpret=True)
  visible = np.asarray(ragged_visible(lengths, cap, None))
  expected = attention_np(np.asarray(q, np.float64), _dequantized(k, ks), _dequantized(v, vs),
                          visible, scale=h ** -0.5)
  err = np.abs(np.asarray(out, np.float64) - expected).max() / np.abs(expected).max()
  assert err < 1e-2, err


def test_paged_int8_pv_with_missing_pages_and_splits():
  """The paged GPU kernel on the int8 path (bfloat16 query), split-K, with a -1 slot inside a
  row's length and a row whose every page is missing: float64 over the visible entries."""
  rng = np.random.default_rng(9)
  batch, heads, kv_heads, h, tpp, max_pages = 3, 8, 2, 32, 8, 6
  num_pages = batch * max_pages
  quant = KVQuant("int8")
  pool_k, pool_ks = quantize(jnp.asarray(rng.normal(size=(num_pages, tpp, kv_heads, h))), quant)
  pool_v, pool_vs = quantize(jnp.asarray(rng.normal(size=(num_pages, tpp, kv_heads, h))), quant)
  table = rng.permutation(num_pages).reshape(batch, max_pages).astype(np.int32)
  table[0, 2] = -1  # a missing page inside row 0's length
  table[2, :] = -1  # row 2: no page at all, though its length says 20
  lengths = jnp.asarray([45, 30, 20], jnp.int32)
  q = jnp.asarray(rng.normal(size=(batch, heads, h)), jnp.bfloat16)
  slots = np.arange(batch, dtype=np.int32)
  out = paged_decode_pallas(q, pool_k, pool_v, jnp.asarray(table), lengths,
                            page_owner=jnp.asarray(page_owners(table, slots, num_pages)),
                            slots=jnp.asarray(slots), scale=h ** -0.5, key_scale=pool_ks,
                            value_scale=pool_vs, pages_per_block=4, blocks_per_split=1,
                            interpret=True)
  table = jnp.asarray(table)
  k = _dequantized(gather_pages(pool_k, table), gather_pages(pool_ks, table))
  v = _dequantized(gather_pages(pool_v, table), gather_pages(pool_vs, table))
  cap = max_pages * tpp
  visible = np.arange(cap)[None, :] < np.asarray(lengths)[:, None]
  visible &= np.repeat(np.asarray(table) >= 0, tpp, axis=1)
  expected = attention_np(np.asarray(q, np.float64), k, v, visible, scale=h ** -0.5)
  np.testing.assert_array_equal(np.asarray(out, np.float64)[2], 0.0)
  _assert_within_output_rounding(out, expected, jnp.bfloat16)
