"""The contiguous cache's quantization scales: stored head-major [B, K or 1, C], where the
ragged decode kernels read them, and consistent with `quantize` and `read_block`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head

B, MAX_LEN, K, H = 3, 12, 2, 8


@pytest.mark.parametrize("axis", ["dkv", "heads_and_dkv"])
@pytest.mark.parametrize("window", [None, 5], ids=["contiguous", "ring"])
def test_scales_land_head_major_at_each_tokens_entry(axis, window):
  quant = KVQuant("int8", axis)
  cache = KVCache(B, MAX_LEN, K, H, quant=quant, window=window)
  heads = K if axis == "dkv" else 1
  assert cache.key_scale[...].shape == (B, heads, cache.capacity)
  rng = np.random.default_rng(0)
  rows = jnp.asarray([2, 0], jnp.int32)
  t = 7
  # Per-token magnitudes spanning two orders: a scale at the wrong entry shows.
  key = jnp.asarray(rng.normal(size=(2, t, K, H)) * np.exp(rng.uniform(-2, 2, (2, t, K, 1))),
                    jnp.float32)
  value = jnp.asarray(rng.normal(size=(2, t, K, H)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  valid = jnp.ones((2, t), bool).at[1, 5:].set(False)  # row 0 writes 5 tokens
  lengths = jnp.asarray([t, 5], jnp.int32)
  cache.write(rows, key, value, positions, valid, lengths)

  _, want = quantize(key, quant)  # [2, t, K or 1]
  stored = np.asarray(cache.key_scale[...])  # [B, K or 1, C]
  for i, (row, n) in enumerate(zip([2, 0], [t, 5])):
    kept = range(max(n - cache.capacity, 0), n)  # a ring keeps the last `capacity` tokens
    for p in kept:
      np.testing.assert_array_equal(stored[row, :, p % cache.capacity], np.asarray(want)[i, p])
  assert np.all(stored[1] == 1.0)  # an untouched slot keeps its initial scales

  # read_block dequantizes with the transposed layout: within the int8 step of every token.
  got, _ = cache.read_block(rows[:1], 0, cache.capacity, jnp.float32)  # [1, C, K, H]
  for p in range(max(t - cache.capacity, 0), t):
    step = np.asarray(want)[0, p][:, None] * 0.5001  # half a quantization step, [K or 1, 1]
    assert np.all(np.abs(np.asarray(got)[0, p % cache.capacity] - np.asarray(key)[0, p]) <= step)


def test_scales_by_head_is_the_cache_layout():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, K, H)), jnp.float32)
  _, scales = quantize(x, KVQuant("int8"))  # [2, 5, K]
  assert scales_by_head(scales).shape == (2, K, 5)
  np.testing.assert_array_equal(scales_by_head(scales)[1, :, 3], scales[1, 3])


def test_scales_shard_by_heads_like_the_cache():
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (("cache_heads", "tensor"),)
  cache = KVCache(B, MAX_LEN, K, H, quant=KVQuant("int8"), mesh=mesh, rules=rules)
  assert cache.key_scale[...].sharding.spec == PartitionSpec(None, "tensor", None)
  assert cache.key[...].sharding.spec == PartitionSpec(None, None, "tensor", None)
