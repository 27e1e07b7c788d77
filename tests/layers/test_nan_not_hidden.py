"""A NaN that reaches a visible key is never hidden as "nothing visible" (zeros).

Invisible keys are selected away (test_invisible_values.py). The other half: a row
that does see a non-finite value must show it. The kernels told "no visible key"
from "some" by `denominator > 0`, which is false for NaN, so blockwise and the
partial-attention merge returned zeros (a finite, wrong answer) for exactly the rows
whose visible keys held the NaN. A NaN value at token 3 of a causal sequence must
make rows 3.. NaN in every kernel; rows before it may or may not be NaN (the dense
p @ V product of dot_product multiplies their zero weight by it, as any dense
attention does), so they are not checked.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.layers import KernelOptions, MaskSpec, dot_product_attention
from meshattn.layers.kernels.train.blockwise import blockwise_attention
from meshattn.layers.kernels.train.partial_attention import (merge_partials,
                                                             reference_partial_attention)

B, T, N, K, H = 2, 8, 4, 2, 8
NAN_AT = 3


def _qkv():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)  # [B, T, N, H]
  k = np.asarray(rng.normal(size=(B, T, K, H)), np.float32)  # [B, S, K, H]
  v = np.asarray(rng.normal(size=(B, T, K, H)), np.float32)  # [B, S, K, H]
  k[:, NAN_AT] = np.nan  # a NaN logit: the softmax denominator of every row seeing it is NaN
  v[:, NAN_AT] = np.nan
  return q, jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("kernel", [
    dot_product_attention,
    lambda *a, **kw: blockwise_attention(*a, block_q=2, block_kv=2, **kw),
    lambda *a, **kw: blockwise_attention(*a, block_q=8, block_kv=8, **kw),
], ids=["dot_product", "blockwise-tiles-2", "blockwise-one-tile"])
def test_rows_that_see_a_nan_show_it(kernel):
  q, k, v = _qkv()
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))  # [B, T]
  out, _ = kernel(q, k, v, options=KernelOptions(mask=MaskSpec("global"), scale=H ** -0.5),
                  q_positions=pos, kv_positions=pos)  # [B, T, N, H]
  assert np.isnan(np.asarray(out)[:, NAN_AT:]).all()


def test_partial_attention_and_its_merge_show_a_seen_nan():
  """The split prefill path: part A (the cache, with the NaN) and part B (the chunk)."""
  q, k, v = _qkv()
  lengths = jnp.full((B,), T, jnp.int32)
  out_a, lse_a = reference_partial_attention(q, k, v, q_lengths=lengths, kv_lengths=lengths,
                                             causal=False, scale=H ** -0.5)
  out_b, lse_b = reference_partial_attention(q, jnp.nan_to_num(k), jnp.nan_to_num(v), q_lengths=lengths, kv_lengths=lengths,
                                             causal=False, scale=H ** -0.5)
  assert np.isnan(np.asarray(out_a)).all()
  assert np.isnan(np.asarray(merge_partials(out_a, lse_a, out_b, lse_b))).all()
  # ... while a part that sees nothing is still dropped, whatever its output holds.
  empty = jnp.zeros((B,), jnp.int32)
  out_e, lse_e = reference_partial_attention(q, k, v, q_lengths=lengths, kv_lengths=empty,
                                             causal=False, scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(merge_partials(out_e, lse_e, out_b, lse_b)),
                             np.asarray(out_b), rtol=1e-6)


def test_decode_rows_that_see_a_nan_show_it():
  """The decode reference (online_softmax.finish): a NaN key inside a row's length makes
  that row NaN; a row whose length stops before it stays finite (selected away)."""
  from meshattn.layers.kernels.decode.ragged import ragged_decode_reference
  _, k, v = _qkv()
  q = jnp.asarray(np.random.default_rng(1).normal(size=(B, N, H)), jnp.float32)  # [B, N, H]
  lengths = jnp.array([NAN_AT + 1, NAN_AT], jnp.int32)  # row 0 sees the NaN, row 1 does not
  out = np.asarray(ragged_decode_reference(q, k, v, lengths, scale=H ** -0.5))  # [B, N, H]
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
