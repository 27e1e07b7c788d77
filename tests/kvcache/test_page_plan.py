"""The page-allocation policy (kvcache/page_plan.py) and its two users agreeing.

PagedKVCache manages one cache's tables and the serving engine's EnginePages keeps one
host copy for every layer; both apply page_plan, and both clear freed pages on the
device through PagedKVCache.clear_freed. The last test drives both with the same
seeded sequence of reserves and releases and checks the device state matches.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.kvcache import page_plan
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.quant import KVQuant
from meshattn.layers.engine_pages import EnginePages

TPP, MAX_LENGTH = 4, 12  # 3 pages per sequence at most


def empty_tables(num_slots=3, num_pages=6):
  owner = np.full((num_pages,), page_plan.FREE, np.int32)  # [P]
  table = np.full((num_slots, MAX_LENGTH // TPP), page_plan.FREE, np.int32)  # [S, M]
  return owner, table


def allocate(owner, table, slots, totals):
  return page_plan.allocate(owner, table, np.asarray(slots, np.int64), totals,
                            tokens_per_page=TPP, max_length=MAX_LENGTH, who="test")


def test_lowest_free_page_first_slots_in_order():
  owner, table = empty_tables()
  assert allocate(owner, table, [2, 0], [5, 3])  # slot 0 first (1 page), then slot 2 (2)
  np.testing.assert_array_equal(table, [[0, -1, -1], [-1, -1, -1], [1, 2, -1]])
  np.testing.assert_array_equal(owner, [0, 2, 2, -1, -1, -1])
  freed = page_plan.release(owner, table, np.array([0]))
  np.testing.assert_array_equal(freed, [True, False, False, False, False, False])
  assert allocate(owner, table, [1], 9)  # 3 pages: the freed page 0, then 3 and 4
  np.testing.assert_array_equal(table[1], [0, 3, 4])
  assert allocate(owner, table, [2], 12)  # slot 2's third logical page: 5
  np.testing.assert_array_equal(table[2], [1, 2, 5])


def test_all_or_nothing():
  owner, table = empty_tables()
  allocate(owner, table, [0], 8)
  before = owner.copy(), table.copy()
  with pytest.raises(ValueError, match=r"test out of pages: slots \[1, 2\] need 5 more page\(s\) "
                                       r"of 4 tokens but only 4 of num_pages=6 are free"):
    allocate(owner, table, [1, 2], [12, 8])  # 3 + 2 pages, 4 free: neither slot gets any
  with pytest.raises(ValueError, match=r"cannot reserve \[13\] tokens.*max_length=12"):
    allocate(owner, table, [1, 2], [4, 13])
  with pytest.raises(ValueError, match=r"slot \[3\] out of range; slots must be in \[0, 3\)"):
    page_plan.as_slots([1, 3], 3, "test")
  np.testing.assert_array_equal(owner, before[0])
  np.testing.assert_array_equal(table, before[1])


def test_re_reserve_is_idempotent_and_never_shrinks():
  owner, table = empty_tables()
  assert allocate(owner, table, [1], 6)
  before = owner.copy(), table.copy()
  assert not allocate(owner, table, [1], 6)
  assert not allocate(owner, table, [1], 1)
  assert not allocate(owner, table, [1, 1], [0, 8])  # a slot named twice: the larger total
  np.testing.assert_array_equal(owner, before[0])
  np.testing.assert_array_equal(table, before[1])


def test_release_frees_exactly_the_slots_pages():
  owner, table = empty_tables(num_slots=3, num_pages=8)
  allocate(owner, table, [0, 1, 2], [5, 9, 4])
  before = owner.copy(), table.copy()
  freed = page_plan.release(owner, table, np.array([1]))
  np.testing.assert_array_equal(freed, before[0] == 1)
  np.testing.assert_array_equal(owner, np.where(before[0] == 1, -1, before[0]))
  np.testing.assert_array_equal(table[[0, 2]], before[1][[0, 2]])
  assert (table[1] == -1).all()
  assert not page_plan.release(owner, table, np.array([1])).any()  # nothing left to free


def device_state(cache):
  return {name: np.asarray(getattr(cache, name)[...], np.float32)
          for name in ("page_table", "page_owner", "lengths", "key_pages", "value_pages",
                       "key_scale", "value_scale")}


def test_engine_pages_and_paged_cache_agree():
  """Same seeded reserve / release sequence: EnginePages (+ push) and PagedKVCache's own
  reserve_for_step / free give the same tables, lengths, pools and scales, and refuse
  the same calls."""
  num_slots, num_pages = 4, 7
  caches = [PagedKVCache(num_slots, MAX_LENGTH, 1, 2, num_pages=num_pages, tokens_per_page=TPP,
                         quant=KVQuant("int8")) for _ in range(2)]
  for cache in caches:  # stale data everywhere, so clearing shows
    cache.key_pages[...] = jnp.ones_like(cache.key_pages[...])
    cache.value_pages[...] = jnp.full_like(cache.value_pages[...], 3)
    cache.key_scale[...] = jnp.full_like(cache.key_scale[...], 2.0)
  engine_cache, own_cache = caches
  pages = EnginePages([engine_cache])
  rng = np.random.default_rng(16)
  refused = 0
  for _ in range(24):
    slots = rng.choice(num_slots, size=int(rng.integers(1, 3)), replace=False)
    if rng.random() < 0.6:
      totals = rng.integers(0, MAX_LENGTH + 1, size=slots.size)
      held = np.asarray(own_cache.lengths[...])[slots]
      outcomes = []
      for reserve in (lambda: pages.reserve(slots, totals),
                      lambda: own_cache.reserve_for_step(slots, totals - held)):
        try:
          reserve()
          outcomes.append("ok")
        except ValueError as error:
          assert "out of pages" in str(error)
          outcomes.append("refused")
      assert outcomes[0] == outcomes[1], (slots, totals)
      refused += outcomes[0] == "refused"
      if outcomes[0] == "ok":  # as if a step had written the tokens
        for cache in caches:
          cache.lengths[...] = cache.lengths[...].at[slots].set(np.maximum(held, totals))
    else:
      pages.release(slots)
      own_cache.free(slots)
    pages.push(engine_cache)
    engine_state, own_state = device_state(engine_cache), device_state(own_cache)
    for name, value in engine_state.items():
      np.testing.assert_array_equal(value, own_state[name], err_msg=name)
    np.testing.assert_array_equal(engine_state["page_table"], pages.table)
    np.testing.assert_array_equal(engine_state["page_owner"], pages.owner)
  assert 0 < refused < 24  # the sequence exercised both outcomes
