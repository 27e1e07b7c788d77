"""Shared by the decode kernel tests: tiny shapes, float64 NumPy attention, inputs.

The NumPy attention is written from the math over an explicit list of each
row's visible keys (not from the JAX code), so the references cannot share a
masking bug with it. Lengths include 0, the full capacity, 1 and values that
are not multiples of the block or the page, and the last block is partial.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head
from meshattn.layers.kernels.decode.ragged import ragged_decode_pallas, ragged_decode_reference

N, H = 4, 16
S = 36  # ragged capacity: not a multiple of BLOCK
BLOCK = 8
LENGTHS = np.array([0, S, 13, 1, 27], np.int32)
SCALE = 0.35
TPP, MAX_PAGES, NUM_PAGES = 8, 5, 16  # paged: capacity 40, 12 pages used of 16
PAGED_LENGTHS = np.array([0, 40, 13, 1, 27], np.int32)
# The cache slot of each paged row: not the row index, so a kernel that compared page owners
# with row indices would fail.
PAGED_SLOTS = np.array([3, 0, 4, 2, 1], np.int32)
TOL = dict(atol=1e-5, rtol=1e-5)
KV_HEADS = pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
BACKENDS = pytest.mark.parametrize("backend", ["gpu", "tpu"])
KV_IDS = {4: "mha", 2: "gqa", 1: "mqa"}

# name -> (window, soft_cap, sinks?, int8 quant axis or None)
CASES = {
    "plain": (None, None, False, None),
    "window": (5, None, False, None),
    "window_wide": (100, None, False, None),
    "soft_cap": (None, 1.5, False, None),
    "sinks": (None, None, True, None),
    "int8": (None, None, False, "dkv"),
    "int8_token": (None, None, False, "heads_and_dkv"),
    "all": (6, 2.0, True, "dkv"),
    "all_float": (6, 2.0, True, None),
}
PAGED_CASES = ("plain", "soft_cap", "sinks", "int8", "int8_token", "all", "all_float")


# The ragged kernel under one jit per configuration (static options, input shapes): a test
# that repeats another's configuration on other values (test_ragged_ignores_entries_past_length:
# garbage past the lengths) reuses its compile; eagerly every call re-lowers and recompiles
# the interpreted kernel.
ragged_pallas = jax.jit(ragged_decode_pallas, static_argnames=(
    "scale", "soft_cap", "window", "block_kv", "interpret", "backend", "num_splits",
    "blocks_per_split", "num_warps", "num_stages"))


def kernel_matrix(cases):
  """Every case with GQA, and the all-features cases with MHA and MQA too (keeps the suite fast)."""
  params = [pytest.param(case, 2, id=f"{case}-gqa") for case in cases]
  for kv_heads in (4, 1):
    for case in ("all", "all_float"):
      params.append(pytest.param(case, kv_heads, id=f"{case}-{KV_IDS[kv_heads]}"))
  return pytest.mark.parametrize("case, kv_heads", params)


# ---- float64 NumPy attention ---------------------------------------------------------


def attention_np(q, k, v, visible, *, scale, soft_cap=None, sinks=None):
  """q [B, N, H], k/v [B, S, K, H] float64, visible [B, S] -> [B, N, H], over visible keys only."""
  batch, heads, _ = q.shape
  group = heads // k.shape[2]
  out = np.zeros(q.shape[:2] + (v.shape[-1],))
  for b in range(batch):
    idx = np.flatnonzero(visible[b])
    for n in range(heads):
      kv = n // group
      logits = k[b, idx, kv] @ q[b, n] * scale  # [len]
      if soft_cap:
        logits = soft_cap * np.tanh(logits / soft_cap)
      if sinks is not None:
        logits = np.append(logits, sinks[n])
      if logits.size == 0:
        continue
      e = np.exp(logits - logits.max())
      p = e / e.sum()
      out[b, n] = p[:idx.size] @ v[b, idx, kv]
  return out


def dequant_np(values, scales):
  return np.asarray(values, np.float64) * np.asarray(scales, np.float64)[..., None]


def ragged_visible_np(lengths, capacity, window):
  vis = np.zeros((len(lengths), capacity), bool)
  for b, n in enumerate(lengths):
    for j in range(capacity):
      vis[b, j] = j < n and (window is None or n - 1 - j < window)
  return vis


# ---- inputs ----------------------------------------------------------------------------


def ragged_inputs(case, kv_heads, seed=0, dtype=jnp.float32):
  """(query, key, value, kwargs, numpy key/value float64, sinks) for one case."""
  window, soft_cap, with_sinks, axis = CASES[case]
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(len(LENGTHS), N, H)).astype(np.float32)
  k = rng.normal(size=(len(LENGTHS), S, kv_heads, H)).astype(np.float32)
  v = rng.normal(size=(len(LENGTHS), S, kv_heads, H)).astype(np.float32)
  sinks = rng.normal(size=N).astype(np.float32) if with_sinks else None
  kwargs = dict(scale=SCALE, soft_cap=soft_cap, window=window,
                sinks=None if sinks is None else jnp.asarray(sinks))
  if axis:
    quant = KVQuant("int8", axis)
    kq, ks = quantize(jnp.asarray(k), quant)
    vq, vs = quantize(jnp.asarray(v), quant)
    kwargs.update(key_scale=scales_by_head(ks), value_scale=scales_by_head(vs))  # [B, K|1, S]
    k64, v64 = dequant_np(kq, ks), dequant_np(vq, vs)
    key, value = kq, vq
  else:
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    key, value = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  return jnp.asarray(q, dtype), key, value, kwargs, (q.astype(np.float64), k64, v64, sinks)


def poison_past_lengths(key, value, kwargs, lengths):
  """(key, value, kwargs) with every entry past each row's length made harmful if read: NaN
  keys and inf values, or for an int8 cache extreme codes and NaN scales [B, K|1, S]."""
  past = jnp.arange(key.shape[1])[None, :] >= lengths[:, None]  # [B, S]
  kwargs = dict(kwargs)
  if kwargs.get("key_scale") is not None:
    key = jnp.where(past[..., None, None], jnp.int8(127), key)
    value = jnp.where(past[..., None, None], jnp.int8(-127), value)
    kwargs["key_scale"] = jnp.where(past[:, None], jnp.nan, kwargs["key_scale"])
    kwargs["value_scale"] = jnp.where(past[:, None], jnp.nan, kwargs["value_scale"])
  else:
    key = jnp.where(past[..., None, None], jnp.nan, key)
    value = jnp.where(past[..., None, None], jnp.inf, value)
  return key, value, kwargs


def to_pages(logical, lengths, rng, fill=0.0):
  """logical [B, C, ...] -> (pages [P, TPP, ...], page_table [B, MAX_PAGES]) in shuffled page order.

  Row b owns ceil(lengths[b] / TPP) pages, taken from a random permutation of
  the pool; its other table entries are -1, and unowned pages hold `fill`.
  """
  logical = np.asarray(logical)
  order = rng.permutation(NUM_PAGES)
  pages = np.full((NUM_PAGES, TPP) + logical.shape[2:], fill, logical.dtype)
  table = np.full((len(lengths), MAX_PAGES), -1, np.int32)
  used = 0
  for b, n in enumerate(lengths):
    for col in range(-(-int(n) // TPP)):
      page = order[used]
      used += 1
      table[b, col] = page
      pages[page] = logical[b, col * TPP:(col + 1) * TPP]
  return pages, table


def page_owners(table, slots=PAGED_SLOTS, num_pages=NUM_PAGES):
  """page_owner [P] int32 of a page table [B, maxp]: slots[b] for row b's pages, -1 for free."""
  owner = np.full(num_pages, -1, np.int32)
  for b, row in enumerate(np.asarray(table)):
    owner[row[row >= 0]] = slots[b]
  return owner


def paged_inputs(case, kv_heads, seed=0, garbage=False):
  """Paged versions of ragged_inputs (capacity MAX_PAGES * TPP); garbage fills unowned pages.

  kwargs carry the ownership arguments: row b is slot PAGED_SLOTS[b], owning its table's pages.
  """
  _, soft_cap, with_sinks, axis = CASES[case]
  rng = np.random.default_rng(seed)
  batch, cap = len(PAGED_LENGTHS), MAX_PAGES * TPP
  q = rng.normal(size=(batch, N, H)).astype(np.float32)
  k = rng.normal(size=(batch, cap, kv_heads, H)).astype(np.float32)
  v = rng.normal(size=(batch, cap, kv_heads, H)).astype(np.float32)
  sinks = rng.normal(size=N).astype(np.float32) if with_sinks else None
  kwargs = dict(scale=SCALE, soft_cap=soft_cap, sinks=None if sinks is None else jnp.asarray(sinks))
  if garbage:  # entries past each row's length, inside its own last page
    for b, n in enumerate(PAGED_LENGTHS):
      k[b, n:], v[b, n:] = np.nan, np.nan
  if axis:
    quant = KVQuant("int8", axis)
    kq, ks = (np.array(a) for a in quantize(jnp.asarray(np.nan_to_num(k)), quant))
    vq, vs = (np.array(a) for a in quantize(jnp.asarray(np.nan_to_num(v)), quant))
    k64, v64 = dequant_np(kq, ks), dequant_np(vq, vs)
    if garbage:
      for b, n in enumerate(PAGED_LENGTHS):
        kq[b, n:], vq[b, n:], ks[b, n:], vs[b, n:] = 127, -127, np.nan, np.nan
    fill_scale = np.nan if garbage else 1.0
    perm_seed = rng.integers(1 << 30)
    key_pages, table = to_pages(kq, PAGED_LENGTHS, np.random.default_rng(perm_seed), 127 if garbage else 0)
    value_pages, _ = to_pages(vq, PAGED_LENGTHS, np.random.default_rng(perm_seed), -127 if garbage else 0)
    ks_pages, _ = to_pages(ks, PAGED_LENGTHS, np.random.default_rng(perm_seed), fill_scale)
    vs_pages, _ = to_pages(vs, PAGED_LENGTHS, np.random.default_rng(perm_seed), fill_scale)
    kwargs.update(key_scale=jnp.asarray(ks_pages), value_scale=jnp.asarray(vs_pages))
  else:
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    perm_seed = rng.integers(1 << 30)
    fill = np.nan if garbage else 0.0
    key_pages, table = to_pages(k, PAGED_LENGTHS, np.random.default_rng(perm_seed), fill)
    value_pages, _ = to_pages(v, PAGED_LENGTHS, np.random.default_rng(perm_seed), fill)
  arrays = (jnp.asarray(q), jnp.asarray(key_pages), jnp.asarray(value_pages), jnp.asarray(table),
            jnp.asarray(PAGED_LENGTHS))
  kwargs.update(page_owner=jnp.asarray(page_owners(table)), slots=jnp.asarray(PAGED_SLOTS))
  return arrays, kwargs, (q.astype(np.float64), k64, v64, sinks)


def numpy_for(case, np_inputs, lengths, capacity, window=None):
  q64, k64, v64, sinks = np_inputs
  _, soft_cap, _, _ = CASES[case]
  visible = ragged_visible_np(lengths, capacity, window)
  return attention_np(q64, np.nan_to_num(k64), np.nan_to_num(v64), visible, scale=SCALE,
                      soft_cap=soft_cap, sinks=sinks)


def check_ragged_pallas(case, kv_heads, seed=0, **kernel_kwargs):
  """The ragged Pallas kernel (interpret mode, block BLOCK) on ragged_inputs(case) against the
  JAX reference and the float64 NumPy attention; returns its output."""
  q, k, v, kwargs, np_inputs = ragged_inputs(case, kv_heads, seed=seed)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True, **kernel_kwargs)
  assert out.shape == (len(LENGTHS), N, H) and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  expected = numpy_for(case, np_inputs, LENGTHS, S, CASES[case][0])
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)
  return out
