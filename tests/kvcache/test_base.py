"""The cache base (kvcache/base.py): what a new cache kind gets by deriving it, with no
arrays of its own: lengths and rejection bits, placement by logical names, the step checks
and their messages naming the kind. No compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.kvcache import CacheBase, KVCache, PagedKVCache
from meshattn.kvcache.step_checks import Rejection, StepRejected


class StateCache(CacheBase):
  """A kind with one array of its own, as a recurrent-state cache would have."""

  def __init__(self, batch_size, max_length, **kw):
    super().__init__(batch_size, max_length, num_kv_heads=2, head_dim=4, **kw)
    names = (self.axis_names[0], self.axis_names[2], None)
    self.state_placed = self.place(np.zeros((batch_size, 2, 4), np.float32), names)


def test_a_derived_kind_has_lengths_checks_and_messages():
  cache = StateCache(3, 8)
  assert cache.lengths[...].shape == (3,) and cache.lengths[...].dtype == jnp.int32
  assert int(cache.rejected[...]) == 0 and cache.kernel_features == frozenset()
  assert cache.window is None and cache.quant is None
  with pytest.raises(StepRejected, match=r"StateCache: .*slot index out of range.*\[0, 3\)"):
    cache.check_slots(np.asarray([0, 3]))
  with pytest.raises(StepRejected, match=r"StateCache: .*max_length=8.*slots \[1\]"):
    cache.check_room(jnp.asarray([1]), jnp.asarray([9]))
  cache.check_room(jnp.asarray([1]), jnp.asarray([8]))  # fits: no raise
  conditions = cache.step_conditions(jnp.asarray([0, 5]), jnp.asarray([2, 9]))
  assert set(conditions) == {Rejection.SLOT_OUT_OF_RANGE, Rejection.PAST_MAX_LENGTH}
  np.testing.assert_array_equal(conditions[Rejection.SLOT_OUT_OF_RANGE], [False, True])


def test_sizes_and_axis_names_are_checked_before_any_state():
  with pytest.raises(ValueError, match="StateCache needs batch_size >= 1"):
    StateCache(0, 8)
  with pytest.raises(ValueError, match="axis_names .* need 4"):
    StateCache(2, 8, axis_names=("cache_batch", "cache_heads"))


def test_placement_follows_the_logical_rules():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cache = StateCache(4, 8, mesh=mesh, rules=(("cache_batch", "data"), ("cache_heads", "tensor")))
  assert cache.lengths[...].sharding.spec == jax.sharding.PartitionSpec("data")
  assert cache.state_placed.sharding.spec == jax.sharding.PartitionSpec("data", "tensor", None)
  assert int(cache.rejected[...]) == 0  # replicated: every process can read it


def test_both_kv_kinds_share_the_base():
  kv = KVCache(2, 8, 2, 4)
  paged = PagedKVCache(2, 8, 2, 4, num_pages=4, tokens_per_page=4)
  assert kv.bytes_per_token == paged.bytes_per_token == 2 * 2 * 4 * 4
  assert paged.kernel_features == frozenset({"paged_kv"}) and kv.kernel_features == frozenset()
  with pytest.raises(StepRejected, match="PagedKVCache: .*pages"):
    paged.check_room(jnp.asarray([0]), jnp.asarray([3]))  # no page reserved
