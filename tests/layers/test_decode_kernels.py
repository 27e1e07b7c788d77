"""Decode kernels (ragged and paged): Pallas (interpret mode) vs reference vs float64 NumPy.

The NumPy attention below is written from the math over an explicit list of
each row's visible keys (not from the JAX code), so the references cannot
share a masking bug with it; the Pallas kernels are then compared with the
references. Shapes are tiny and chosen so that lengths include 0, the full
capacity, 1 and values that are not multiples of the block or the page, and
the last block of the cache is partial.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.layers.kernels.decode import paged as paged_mod
from meshattn.layers.kernels.decode import ragged as ragged_mod
from meshattn.layers.kernels.decode.paged import (
    PAGED_FEATURES, paged_decode_pallas, paged_decode_reference)
from meshattn.layers.kernels.decode.ragged import (
    RAGGED_FEATURES, ragged_decode_pallas, ragged_decode_reference)

from helpers.decode_inputs import (
    BACKENDS, BLOCK, CASES, KV_HEADS, LENGTHS, MAX_PAGES, PAGED_CASES, PAGED_LENGTHS, S, TOL,
    TPP, check_ragged_pallas, kernel_matrix, numpy_for, paged_inputs, poison_past_lengths,
    ragged_inputs, ragged_pallas, ragged_visible_np, to_pages)


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
  check_ragged_pallas(case, kv_heads, backend=backend)


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
  k, v, kwargs = poison_past_lengths(k, v, kwargs, lengths)
  outs = [ragged_decode_reference(q, k, v, lengths, **kwargs)]
  for backend in ("gpu", "tpu"):  # the configurations of test_ragged_pallas_vs_reference[case-gqa]
    outs.append(ragged_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
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
  # Scales in the token-major layout `quantize` returns: the cache and kernels take [B, K|1, S].
  token_major = {**kwargs, "key_scale": jnp.swapaxes(kwargs["key_scale"], 1, 2),
                 "value_scale": jnp.swapaxes(kwargs["value_scale"], 1, 2)}
  for call in (ragged_decode_reference, functools.partial(ragged_decode_pallas, interpret=True)):
    with pytest.raises(ValueError, match=r"key_scale must be \[B, K or 1, S\]"):
      call(q, k, v, lengths, **token_major)
  with pytest.raises(ValueError, match="multiple of 128"):  # only checked when compiling for TPU
    ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=16, backend="tpu")


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
