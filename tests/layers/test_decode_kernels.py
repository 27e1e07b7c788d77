"""Decode kernels (ragged and paged): Pallas (interpret mode) vs reference vs float64 NumPy.

The NumPy attention below is written from the math over an explicit list of
each row's visible keys (not from the JAX code), so the references cannot
share a masking bug with it; the Pallas kernels are then compared with the
references. Shapes are tiny and chosen so that lengths include 0, the full
capacity, 1 and values that are not multiples of the block or the page, and
the last block of the cache is partial.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.kvcache.quant import KVQuant, quantize
from meshattn.layers.kernels import paged as paged_mod
from meshattn.layers.kernels import decode_common
from meshattn.layers.kernels import ragged as ragged_mod
from meshattn.layers.kernels.paged import (
    PAGED_FEATURES, paged_decode_pallas, paged_decode_reference)
from meshattn.layers.kernels.ragged import (
    RAGGED_FEATURES, ragged_decode_pallas, ragged_decode_reference)

N, H = 4, 16
S = 36  # ragged capacity: not a multiple of BLOCK
BLOCK = 8
LENGTHS = np.array([0, S, 13, 1, 27], np.int32)
SCALE = 0.35
TPP, MAX_PAGES, NUM_PAGES = 8, 5, 16  # paged: capacity 40, 12 pages used of 16
PAGED_LENGTHS = np.array([0, 40, 13, 1, 27], np.int32)
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
    kwargs.update(key_scale=ks, value_scale=vs)
    k64, v64 = dequant_np(kq, ks), dequant_np(vq, vs)
    key, value = kq, vq
  else:
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    key, value = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  return jnp.asarray(q, dtype), key, value, kwargs, (q.astype(np.float64), k64, v64, sinks)


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


def paged_inputs(case, kv_heads, seed=0, garbage=False):
  """Paged versions of ragged_inputs (capacity MAX_PAGES * TPP); garbage fills unowned pages."""
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
  return arrays, kwargs, (q.astype(np.float64), k64, v64, sinks)


def numpy_for(case, np_inputs, lengths, capacity, window=None):
  q64, k64, v64, sinks = np_inputs
  _, soft_cap, _, _ = CASES[case]
  visible = ragged_visible_np(lengths, capacity, window)
  return attention_np(q64, np.nan_to_num(k64), np.nan_to_num(v64), visible, scale=SCALE,
                      soft_cap=soft_cap, sinks=sinks)


# ---- ragged -----------------------------------------------------------------------------


def test_feature_sets():
  allowed = {"gqa", "causal", "window", "soft_cap", "sinks", "quantized_kv", "paged_kv"}
  assert RAGGED_FEATURES <= allowed and PAGED_FEATURES <= allowed
  assert "paged_kv" in PAGED_FEATURES and "window" in RAGGED_FEATURES


@KV_HEADS
@pytest.mark.parametrize("case", list(CASES))
def test_ragged_reference_vs_numpy(case, kv_heads):
  q, k, v, kwargs, np_inputs = ragged_inputs(case, kv_heads)
  out = ragged_decode_reference(q, k, v, jnp.asarray(LENGTHS), **kwargs)
  expected = numpy_for(case, np_inputs, LENGTHS, S, CASES[case][0])
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)
  np.testing.assert_array_equal(np.asarray(out)[0], 0.0)  # the row of length 0


@BACKENDS
@kernel_matrix(list(CASES))
def test_ragged_pallas_vs_reference(case, kv_heads, backend):
  q, k, v, kwargs, np_inputs = ragged_inputs(case, kv_heads)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             backend=backend)
  assert out.shape == (len(LENGTHS), N, H) and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  expected = numpy_for(case, np_inputs, LENGTHS, S, CASES[case][0])
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)


@BACKENDS
@pytest.mark.parametrize("block_kv", [16, 64])
def test_ragged_pallas_block_sizes(block_kv, backend):
  """A block of 16 (last one partial) and one larger than the whole cache."""
  q, k, v, kwargs, _ = ragged_inputs("all", 2, seed=3)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=block_kv, interpret=True,
                             backend=backend)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)


@BACKENDS
def test_ragged_bfloat16(backend):
  q, k, v, kwargs, _ = ragged_inputs("all_float", 2, dtype=jnp.bfloat16)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             backend=backend)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["all_float", "all", "int8_token"])
def test_ragged_ignores_entries_past_length(case):
  """NaN / garbage past each row's length changes nothing, in the reference and both kernels."""
  q, k, v, kwargs, _ = ragged_inputs(case, 2)
  lengths = jnp.asarray(LENGTHS)
  clean = ragged_decode_reference(q, k, v, lengths, **kwargs)
  past = jnp.arange(S)[None, :] >= lengths[:, None]  # [B, S]
  if kwargs.get("key_scale") is not None:
    k = jnp.where(past[..., None, None], jnp.int8(127), k)
    v = jnp.where(past[..., None, None], jnp.int8(-127), v)
    kwargs["key_scale"] = jnp.where(past[..., None], jnp.nan, kwargs["key_scale"])
    kwargs["value_scale"] = jnp.where(past[..., None], jnp.nan, kwargs["value_scale"])
  else:
    k = jnp.where(past[..., None, None], jnp.nan, k)
    v = jnp.where(past[..., None, None], jnp.inf, v)
  outs = [ragged_decode_reference(q, k, v, lengths, **kwargs)]
  for backend in ("gpu", "tpu"):
    outs.append(ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                                     backend=backend))
  for out in outs:
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), **TOL)


def test_ragged_tpu_blocks_read_are_the_visible_ones():
  """The TPU index_map (clamped) visits exactly the blocks that hold visible entries."""
  for window in (None, 5, 100):
    for n in range(0, S + 1):
      first, last = ragged_mod.ragged_block_range(jnp.int32(n), BLOCK, window)
      fetched = {int(np.clip(i, first, last)) for i in range(-(-S // BLOCK))}
      visible = np.flatnonzero(ragged_visible_np([n], S, window)[0])
      expected = set((visible // BLOCK).tolist()) or {0}  # an empty row still maps somewhere
      assert fetched == expected, (window, n, fetched, expected)


def test_ragged_rejects_bad_arguments():
  q, k, v, kwargs, _ = ragged_inputs("int8", 2)
  lengths = jnp.asarray(LENGTHS)
  with pytest.raises(ValueError, match="window"):
    ragged_decode_reference(q, k, v, lengths, scale=1.0, window=0)
  with pytest.raises(ValueError, match="key_scale"):
    ragged_decode_pallas(q, k, v, lengths, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="backend"):
    ragged_decode_pallas(q, k, v, lengths, **kwargs, interpret=True, backend="cpu")
  with pytest.raises(ValueError, match="power"):  # only checked when compiling for Triton
    ragged_decode_pallas(q[..., :12], k[..., :12], v[..., :12], lengths, **kwargs)


# ---- paged ------------------------------------------------------------------------------


@KV_HEADS
@pytest.mark.parametrize("case", PAGED_CASES)
def test_paged_reference_vs_numpy(case, kv_heads):
  arrays, kwargs, np_inputs = paged_inputs(case, kv_heads)
  out = paged_decode_reference(*arrays, **kwargs)
  expected = numpy_for(case, np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)


@BACKENDS
@kernel_matrix(PAGED_CASES)
def test_paged_pallas_vs_reference(case, kv_heads, backend):
  arrays, kwargs, np_inputs = paged_inputs(case, kv_heads)
  ref = paged_decode_reference(*arrays, **kwargs)
  out = paged_decode_pallas(*arrays, **kwargs, interpret=True, backend=backend)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  expected = numpy_for(case, np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)


@BACKENDS
@pytest.mark.parametrize("pages_per_block", [3, 8])
def test_paged_pallas_pages_per_block(pages_per_block, backend):
  """Several pages per step (3 does not divide the 5 table columns; 8 exceeds them)."""
  arrays, kwargs, _ = paged_inputs("all", 2, seed=5)
  ref = paged_decode_reference(*arrays, **kwargs)
  out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=pages_per_block, interpret=True,
                            backend=backend)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)


@pytest.mark.parametrize("case", ["all_float", "all"])
def test_paged_ignores_other_pages_and_entries_past_length(case):
  """NaN in pages outside a row's table and past its length changes nothing (no NaN out)."""
  arrays, kwargs, _ = paged_inputs(case, 2, seed=7, garbage=False)
  clean = paged_decode_reference(*arrays, **kwargs)
  arrays, kwargs, _ = paged_inputs(case, 2, seed=7, garbage=True)
  outs = [paged_decode_reference(*arrays, **kwargs)]
  for backend in ("gpu", "tpu"):
    for ppb in (1, 2):
      outs.append(paged_decode_pallas(*arrays, **kwargs, pages_per_block=ppb, interpret=True,
                                      backend=backend))
  for out in outs:
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), **TOL)


def test_paged_tpu_pages_read_are_the_rows_own():
  """The TPU index_maps only ever name pages from the row's own table (rows of length > 0)."""
  _, table = to_pages(np.zeros((len(PAGED_LENGTHS), MAX_PAGES * TPP)), PAGED_LENGTHS,
                      np.random.default_rng(1))
  for ppb in (1, 2, 3):
    for b, n in enumerate(PAGED_LENGTHS):
      read = set()
      for i in range(-(-MAX_PAGES // ppb)):
        for j in range(ppb):
          slot = int(paged_mod._page_slot(jnp.int32(n), i, j, tpp=TPP, pages_per_block=ppb))
          read.add(int(table[b, slot]))
      own = {int(p) for p in table[b] if p >= 0}
      if n:
        assert read == own, (ppb, b, read, own)


# ---- split-K (flash-decoding) GPU variants ------------------------------------------------
# BLOCK=8 over S=36 gives 5 blocks: 3 splits are 2 blocks each (the full row's
# last one 1 block), 8 splits become 5 splits of one block; shorter rows leave
# their later splits empty, and the rows of length 1 and 0 have at most one
# non-empty split.

SPLIT_CASES = [("plain", 3), ("window", 3), ("soft_cap", 8), ("sinks", 3), ("int8", 8),
               ("int8_token", 3), ("all", 3), ("all", 8), ("all_float", 2)]


@pytest.mark.parametrize("case, num_splits", SPLIT_CASES,
                         ids=[f"{c}-p{p}" for c, p in SPLIT_CASES])
def test_ragged_split_vs_reference(case, num_splits):
  q, k, v, kwargs, np_inputs = ragged_inputs(case, 2, seed=11)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             num_splits=num_splits)
  assert out.shape == (len(LENGTHS), N, H) and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  expected = numpy_for(case, np_inputs, LENGTHS, S, CASES[case][0])
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)
  np.testing.assert_array_equal(np.asarray(out)[0], 0.0)  # the row of length 0


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_ragged_split_heads_and_bfloat16(kv_heads):
  q, k, v, kwargs, _ = ragged_inputs("all_float", kv_heads, dtype=jnp.bfloat16)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             num_splits=4)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["all_float", "int8_token"])
def test_ragged_split_ignores_entries_past_length(case):
  """NaN / garbage past each row's length reaches no split's partials."""
  q, k, v, kwargs, _ = ragged_inputs(case, 2)
  lengths = jnp.asarray(LENGTHS)
  clean = ragged_decode_reference(q, k, v, lengths, **kwargs)
  past = jnp.arange(S)[None, :] >= lengths[:, None]  # [B, S]
  if kwargs.get("key_scale") is not None:
    k = jnp.where(past[..., None, None], jnp.int8(127), k)
    kwargs["key_scale"] = jnp.where(past[..., None], jnp.nan, kwargs["key_scale"])
    kwargs["value_scale"] = jnp.where(past[..., None], jnp.nan, kwargs["value_scale"])
  else:
    k = jnp.where(past[..., None, None], jnp.nan, k)
    v = jnp.where(past[..., None, None], jnp.inf, v)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             num_splits=3)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(clean), **TOL)


PAGED_SPLIT_CASES = [("plain", 1, 2), ("sinks", 2, 3), ("int8", None, 2), ("int8_token", 1, 5),
                     ("all", 1, 3), ("all", 2, 8), ("all_float", None, 2)]


@pytest.mark.parametrize("case, pages_per_block, num_splits", PAGED_SPLIT_CASES,
                         ids=[f"{c}-ppb{b}-p{p}" for c, b, p in PAGED_SPLIT_CASES])
def test_paged_split_vs_reference(case, pages_per_block, num_splits):
  """Shuffled pages, with NaN in unowned pages and past each row's length (garbage=True)."""
  arrays, kwargs, np_inputs = paged_inputs(case, 2, seed=13, garbage=True)
  out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=pages_per_block, interpret=True,
                            num_splits=num_splits)
  assert np.all(np.isfinite(np.asarray(out)))
  expected = numpy_for(case, np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)
  np.testing.assert_array_equal(np.asarray(out)[0], 0.0)


def test_split_bounds_cover_each_rows_blocks_once():
  """Fixed-size splits from the row's first block: disjoint, covering [first, last), in order."""
  for first, last in [(0, 0), (0, 1), (0, 5), (2, 5), (3, 40), (7, 7)]:
    for bps in (1, 2, 3, 8, 64):
      num_splits = -(-max(last - first, 1) // bps)
      starts, ends = (np.asarray(x) for x in decode_common.split_bounds(
          jnp.int32(first), jnp.int32(last), jnp.arange(num_splits), bps))
      assert np.all(ends - starts <= bps)
      seen = [j for start, end in zip(starts, ends) for j in range(start, end)]
      assert seen == list(range(first, last)), (first, last, bps, seen)
      ne = decode_common.split_nonempty(jnp.array([first]), jnp.array([last]), num_splits + 2, bps)
      assert int(ne.sum()) == -(-(last - first) // bps)  # one program per bps blocks, no more


def test_auto_num_splits():
  """Fills ~PROGRAMS_PER_SM programs per SM; never splits below MIN_BLOCKS_PER_SPLIT blocks."""
  auto = decode_common.auto_num_splits
  per_sm, min_blocks = decode_common.PROGRAMS_PER_SM, decode_common.MIN_BLOCKS_PER_SPLIT
  assert auto(8 * 8, 256, cores=132) == min(-(-per_sm * 132 // 64), 256 // min_blocks)  # b8 kv32768
  assert auto(64 * 8, 32, cores=132) == min(-(-per_sm * 132 // 512), 32 // min_blocks)
  assert auto(100_000, 256, cores=132) == 1  # the grid already fills the GPU
  assert auto(1, 2, cores=132) == 1  # too short to split


def test_split_layout():
  layout = decode_common.split_layout
  assert layout(999, programs=1, num_splits=None, blocks_per_split=None, interpret=True) == (999, 1)
  assert layout(5, programs=1, num_splits=3, blocks_per_split=None, interpret=False) == (2, 3)
  assert layout(5, programs=1, num_splits=8, blocks_per_split=None, interpret=False) == (1, 5)
  assert layout(5, programs=1, num_splits=None, blocks_per_split=2, interpret=True) == (2, 3)
  assert layout(5, programs=1, num_splits=None, blocks_per_split=50, interpret=True) == (5, 1)
  bps, splits = layout(256, programs=64, num_splits=None, blocks_per_split=None, interpret=False)
  assert splits * bps >= 256 and splits == -(-256 // bps) and bps >= decode_common.MIN_BLOCKS_PER_SPLIT
  for bad in (dict(num_splits=0), dict(blocks_per_split=0), dict(num_splits=2, blocks_per_split=2)):
    kwargs = dict(num_splits=None, blocks_per_split=None) | bad
    with pytest.raises(ValueError, match="num_splits|blocks_per_split"):
      layout(5, programs=1, interpret=True, **kwargs)


def test_ragged_max_blocks_bounds_every_row():
  """The split grid's extent covers the visible blocks of every length <= capacity, any window."""
  for window in (None, 1, 5, 8, 9, 100):
    for block in (4, 8):
      bound = ragged_mod.ragged_max_blocks(S, block, window)
      for n in range(S + 1):
        _, first, last = ragged_mod.ragged_row_blocks(jnp.int32(n), block, window)
        assert int(last) - int(first) <= bound, (window, block, n)


def test_auto_tile_keeps_shared_memory_per_step():
  """Tiles are sized in the dots' dtype: int8 is staged as the query dtype, so it gets the keys of
  bfloat16; float32 half of them."""
  tile, itemsize = decode_common.auto_tile_keys, decode_common.compute_itemsize
  assert itemsize(jnp.bfloat16, jnp.int8) == 2 and itemsize(jnp.float32, jnp.int8) == 4
  assert itemsize(jnp.bfloat16, jnp.bfloat16) == 2 and itemsize(jnp.float32, jnp.bfloat16) == 4
  assert tile(128, 2) == 128 and tile(128, 4) == 64 and tile(64, 2) == 256
  assert tile(16, 1) == 512 and tile(1024, 4) == 16  # clamped to [16, 512]


# ---- int8 scales applied to logits / probabilities (GPU) ---------------------------------


INT8_CASES = [(axis, dtype, block, splits) for axis in ("dkv", "heads_and_dkv")
              for dtype, block, splits in ((jnp.float32, 16, 1), (jnp.bfloat16, None, 3))]


@pytest.mark.parametrize("axis, dtype, block_kv, num_splits", INT8_CASES,
                         ids=[f"{a}-{jnp.dtype(d).name}-bk{b}-p{p}" for a, d, b, p in INT8_CASES])
def test_ragged_int8_scales_after_the_dot(axis, dtype, block_kv, num_splits):
  """Per-token (dkv: per token and head; heads_and_dkv: per token) scales on the logits and
  probabilities give the reference's dequantized attention; rows 0, 1, full, mixed."""
  rng = np.random.default_rng(21)
  kv_heads, cap = 2, 80
  lengths = jnp.asarray([0, 1, cap, 37, 64, 5], jnp.int32)
  q = jnp.asarray(rng.normal(size=(len(lengths), N, H)), dtype)
  # Scales spanning two orders of magnitude across tokens: a misplaced or
  # transposed scale shows.
  spread = np.exp(rng.uniform(-2.5, 2.5, size=(len(lengths), cap, kv_heads, 1)))
  quant = KVQuant("int8", axis)
  k, ks = quantize(jnp.asarray(rng.normal(size=(len(lengths), cap, kv_heads, H)) * spread), quant)
  v, vs = quantize(jnp.asarray(rng.normal(size=(len(lengths), cap, kv_heads, H)) * spread), quant)
  kwargs = dict(scale=SCALE, soft_cap=3.0, key_scale=ks, value_scale=vs)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=block_kv, interpret=True,
                             num_splits=num_splits)
  tol = TOL if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)
  np.testing.assert_array_equal(np.asarray(out, np.float32)[0], 0.0)


def test_paged_int8_scales_after_the_dot():
  """The paged kernel's int8 path (scales per token and head), several pages per step, split."""
  for case in ("int8", "int8_token"):
    arrays, kwargs, np_inputs = paged_inputs(case, 2, seed=17)
    out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=2, interpret=True,
                              blocks_per_split=1)
    expected = numpy_for(case, np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
    np.testing.assert_allclose(np.asarray(out), expected, **TOL)


INT4_CASES = [("dkv", jnp.float32, 1), ("heads_and_dkv", jnp.float32, 2), ("dkv", jnp.bfloat16, 3)]


@pytest.mark.parametrize("axis, dtype, num_splits", INT4_CASES,
                         ids=[f"{a}-{jnp.dtype(d).name}-p{p}" for a, d, p in INT4_CASES])
def test_ragged_int4_gpu_kernel(axis, dtype, num_splits):
  """int4 K/V (GPU kernel only): the same scale placement, against the reference."""
  q, k, v, _, _ = ragged_inputs("plain", 2, seed=31, dtype=dtype)
  quant = KVQuant("int4", axis)
  k4, ks = quantize(k, quant)
  v4, vs = quantize(v, quant)
  lengths = jnp.asarray(LENGTHS)
  kwargs = dict(scale=SCALE, soft_cap=2.0, window=20, key_scale=ks, value_scale=vs)
  ref = ragged_decode_reference(q, k4, v4, lengths, **kwargs)
  out = ragged_decode_pallas(q, k4, v4, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             num_splits=num_splits)
  tol = TOL if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)


def test_int4_refused_where_no_kernel_path():
  """The TPU ragged kernel and the paged kernels take no int4 (the reference does)."""
  q, k, v, _, _ = ragged_inputs("plain", 2)
  k4, ks = quantize(k, KVQuant("int4"))
  v4, vs = quantize(v, KVQuant("int4"))
  with pytest.raises(NotImplementedError, match="int4"):
    ragged_decode_pallas(q, k4, v4, jnp.asarray(LENGTHS), scale=SCALE, key_scale=ks,
                         value_scale=vs, interpret=True, backend="tpu")
  (q, key_pages, _, table, lengths), _, _ = paged_inputs("plain", 2)
  pk, pks = quantize(key_pages, KVQuant("int4"))
  with pytest.raises(NotImplementedError, match="int4"):
    paged_decode_pallas(q, pk, pk, table, lengths, scale=SCALE, key_scale=pks, value_scale=pks,
                        interpret=True)


# ---- length-aware split layout --------------------------------------------------------


LENGTH_AWARE_CASES = [(1, None), (3, None), (2, 5), (1, 11)]


@pytest.mark.parametrize("blocks_per_split, window", LENGTH_AWARE_CASES,
                         ids=[f"bps{b}-window{w}" for b, w in LENGTH_AWARE_CASES])
def test_ragged_length_aware_splits(blocks_per_split, window):
  """Fixed-size splits: lengths 0, 1, the capacity and mixed; every split count of a row."""
  q, k, v, kwargs, _ = ragged_inputs("all_float", 2, seed=19)
  kwargs["window"] = window
  lengths = jnp.asarray([0, 1, S, 8, 9, 17, 35], jnp.int32)
  q = jnp.concatenate([q, q[:2]])
  k, v = jnp.concatenate([k, k[:2]]), jnp.concatenate([v, v[:2]])
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=4, interpret=True,
                             blocks_per_split=blocks_per_split)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  assert np.all(np.asarray(out)[0] == 0.0) or kwargs["sinks"] is not None


def test_combine_splits_ignores_unwritten_partials():
  """Splits the kernel skipped hold garbage (here NaN / inf) and must not reach the output."""
  rng = np.random.default_rng(23)
  batch, kv_heads, splits, group, head_dim = 3, 2, 4, 2, 8
  m = rng.normal(size=(batch, kv_heads, splits, group, 1)).astype(np.float32)
  l = rng.uniform(0.5, 2.0, size=m.shape).astype(np.float32)
  acc = rng.normal(size=(batch, kv_heads, splits, group, head_dim)).astype(np.float32)
  nonempty = np.array([[True, True, False, False], [False] * 4, [True, False, True, True]])
  want = decode_common.combine_splits(
      jnp.asarray(np.where(nonempty[:, None, :, None, None], m, -1e30)),
      jnp.asarray(np.where(nonempty[:, None, :, None, None], l, 0.0)),
      jnp.asarray(np.where(nonempty[:, None, :, None, None], acc, 0.0)),
      jnp.ones_like(jnp.asarray(nonempty)), None, jnp.float32)
  garbage = ~nonempty[:, None, :, None, None]
  got = decode_common.combine_splits(jnp.asarray(np.where(garbage, np.nan, m)),
                                     jnp.asarray(np.where(garbage, np.inf, l)),
                                     jnp.asarray(np.where(garbage, np.nan, acc)),
                                     jnp.asarray(nonempty), None, jnp.float32)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
  np.testing.assert_array_equal(np.asarray(got)[1], 0.0)  # nothing written: zeros
  sink = jnp.asarray(rng.normal(size=(kv_heads, group, 1)), jnp.float32)
  with_sink = decode_common.combine_splits(jnp.asarray(np.where(garbage, np.nan, m)),
                                           jnp.asarray(l), jnp.asarray(acc), jnp.asarray(nonempty),
                                           sink, jnp.float32)
  np.testing.assert_array_equal(np.asarray(with_sink)[1], 0.0)  # only the sink: no value


PAGED_STEP_CASES = [(2, 1), (2, 2), (4, None), (4, 1)]


@pytest.mark.parametrize("pages_per_block, blocks_per_split", PAGED_STEP_CASES,
                         ids=[f"ppb{b}-bps{p}" for b, p in PAGED_STEP_CASES])
def test_paged_several_pages_per_step_splits(pages_per_block, blocks_per_split):
  """Steps of 2 or 4 pages over 5-page tables (not a multiple), length-aware splits, garbage
  in unowned pages and past each length."""
  arrays, kwargs, np_inputs = paged_inputs("all", 2, seed=29, garbage=True)
  out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=pages_per_block, interpret=True,
                            blocks_per_split=blocks_per_split)
  assert np.all(np.isfinite(np.asarray(out)))
  expected = numpy_for("all", np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)
