"""PagedKVCache: page manager bookkeeping, a stateful model test, isolation, parity with KVCache.

The paged cache must be a drop-in for the contiguous one (same attention
outputs through `cached_step`) while sharing one page pool between slots;
sharing is only safe if a page handed from one sequence to another never
carries the first one's keys/values, which is tested directly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from jax.sharding import PartitionSpec

from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.quant import KVQuant
from meshattn.kvcache.step_checks import Rejection, fold
from meshattn.layers.cached_step import cached_step, step_positions
from meshattn.layers.kernels.api import KernelOptions


def tables(cache):
  """Host copies of the bookkeeping state (to check that a failed call changed nothing)."""
  return {name: np.array(getattr(cache, name)[...])
          for name in ("page_owner", "page_table", "lengths", "key_pages", "value_pages")}


def assert_unchanged(cache, before):
  for name, value in tables(cache).items():
    np.testing.assert_array_equal(value, before[name], err_msg=name)


# ---- 1. page manager --------------------------------------------------------------


def test_attributes():
  cache = PagedKVCache(3, 10, 2, 4, num_pages=6, tokens_per_page=4)
  assert (cache.max_pages_per_sequence, cache.capacity, cache.block_size()) == (3, 12, 4)
  assert cache.window is None and cache.quant is None
  assert cache.key_pages[...].shape == (6, 4, 2, 4)
  assert cache.page_table[...].shape == (3, 3) and cache.page_owner[...].shape == (6,)
  assert cache.bytes_per_token == KVCache(3, 10, 2, 4).bytes_per_token
  quant = PagedKVCache(3, 10, 2, 4, num_pages=6, tokens_per_page=4, quant=KVQuant("int8"))
  assert quant.key_pages[...].dtype == jnp.int8 and quant.key_scale[...].shape == (6, 4, 2)


def test_reserve_free_bookkeeping():
  cache = PagedKVCache(3, 16, 2, 4, num_pages=6, tokens_per_page=4)
  assert cache.num_free_pages() == 6
  cache.reserve(0, 5)
  assert cache.pages_of(0) == [0, 1] and cache.num_free_pages() == 4
  cache.reserve(0, 5)  # idempotent
  cache.reserve(0, 2)  # never shrinks
  assert cache.pages_of(0) == [0, 1] and cache.num_free_pages() == 4
  cache.reserve(1, 4)
  cache.reserve(0, 9)  # grows by one page: the lowest free id
  assert cache.pages_of(1) == [2] and cache.pages_of(0) == [0, 1, 3]
  np.testing.assert_array_equal(cache.page_owner[...], [0, 0, 1, 0, -1, -1])
  np.testing.assert_array_equal(cache.page_table[...], [[0, 1, 3, -1], [2, -1, -1, -1], [-1] * 4])
  cache.reserve(2, 0)
  assert cache.pages_of(2) == []

  cache.lengths[...] = jnp.array([9, 3, 0], jnp.int32)
  cache.free(0)
  assert cache.pages_of(0) == [] and cache.num_free_pages() == 5
  np.testing.assert_array_equal(cache.page_owner[...], [-1, -1, 1, -1, -1, -1])
  np.testing.assert_array_equal(cache.page_table[...][0], [-1] * 4)
  np.testing.assert_array_equal(cache.lengths[...], [0, 3, 0])
  cache.reserve(2, 8)  # reuses the freed pages, lowest first
  assert cache.pages_of(2) == [0, 1]
  cache.reset(jnp.array([1, 2]))  # reset = free, several slots at once
  assert cache.num_free_pages() == 6 and cache.pages_of(1) == cache.pages_of(2) == []


def test_out_of_pages_changes_nothing():
  cache = PagedKVCache(3, 16, 2, 4, num_pages=6, tokens_per_page=4)
  cache.reserve(0, 8)
  cache.reserve(1, 6)
  before = tables(cache)
  with pytest.raises(ValueError, match=r"num_pages=6") as error:
    cache.reserve(2, 12)  # 3 pages, 2 free
  assert "need 3" in str(error.value) and "only 2" in str(error.value)
  assert_unchanged(cache, before)
  assert cache.num_free_pages() == 2
  # reserve_for_step is all-or-nothing: slot 2 alone would fit, slots 0 and 2 do not.
  cache.lengths[...] = jnp.array([8, 6, 0], jnp.int32)
  before = tables(cache)
  with pytest.raises(ValueError, match="out of pages"):
    cache.reserve_for_step(jnp.array([2, 0]), jnp.array([8, 5]))
  assert_unchanged(cache, before)
  cache.reserve_for_step(jnp.array([2, 0]), 1)  # 1 + 1 pages: fits
  assert cache.pages_of(0) == [0, 1, 4] and cache.pages_of(2) == [5]  # slots in id order


def test_bad_slots_and_lengths():
  cache = PagedKVCache(3, 16, 2, 4, num_pages=6, tokens_per_page=4)
  before = tables(cache)
  for call in (lambda: cache.reserve(3, 1), lambda: cache.reserve(-1, 1), lambda: cache.free(3),
               lambda: cache.pages_of(7), lambda: cache.reserve_for_step(jnp.array([0, 5]), 1)):
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
      call()
  with pytest.raises(ValueError, match="max_length=16"):
    cache.reserve(0, 17)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    cache.check_slots(jnp.array([3]))
  assert_unchanged(cache, before)


def test_check_room_needs_reserved_pages():
  cache = PagedKVCache(2, 10, 1, 4, num_pages=6, tokens_per_page=4)
  rows = jnp.array([0, 1])
  with pytest.raises(ValueError, match="reserve"):
    cache.check_room(rows, jnp.array([1, 0]))
  cache.reserve(0, 5)
  cache.check_room(rows, jnp.array([8, 0]))  # two reserved pages hold 8 tokens
  with pytest.raises(ValueError, match="reserve"):
    cache.check_room(rows, jnp.array([9, 0]))
  cache.reserve(0, 10)
  with pytest.raises(ValueError, match="max_length=10"):
    cache.check_room(rows, jnp.array([11, 0]))  # capacity is 12, max_length 10


def test_step_without_reserve_is_flagged_under_jit_and_writes_no_page():
  """Under jit the step's check is a flag (the layer gates the step on it; a raise there
  would abort a sharded program); a token whose page is not reserved is never written."""
  cache = PagedKVCache(2, 8, 1, 4, num_pages=4, tokens_per_page=2)

  @nnx.jit
  def decode(cache, x):
    rows = jnp.arange(2, dtype=jnp.int32)
    new_lengths = cache.lengths[...] + 1
    bits = fold(cache.step_conditions(rows, new_lengths))
    cached_step(cache, rows, x, x, x, positions=step_positions(cache, rows, 1),
                valid=jnp.ones((2, 1), bool), options=KernelOptions())
    return bits

  x = jnp.ones((2, 1, 1, 4), jnp.float32)
  for _ in range(2):
    cache.reserve_for_step(jnp.arange(2), 1)
    assert int(decode(cache, x)) == 0
  pools = [np.asarray(cache.key_pages[...]), np.asarray(cache.value_pages[...])]
  assert int(decode(cache, x)) == Rejection.PAGES_NOT_RESERVED  # page 2 of each slot is missing
  np.testing.assert_array_equal(np.asarray(cache.key_pages[...]), pools[0])
  np.testing.assert_array_equal(np.asarray(cache.value_pages[...]), pools[1])


# ---- 2. stateful model test -------------------------------------------------------

POOL, TPP, SLOTS, KV, HD, MAXLEN = 6, 4, 3, 2, 4, 12


@nnx.jit
def _write(cache, rows, key, value, positions, valid, new_lengths):
  cache.write(rows, key, value, positions, valid, new_lengths)


@nnx.jit
def _reads(cache):
  """read_all, the page-aligned blocks and one unaligned block, all rows."""
  whole = cache.read_all(jnp.float32)
  blocks = [cache.read_block(None, i * TPP, TPP, jnp.float32) for i in range(MAXLEN // TPP)]
  odd = cache.read_block(jnp.array([2, 0], jnp.int32), 3, 6, jnp.float32)
  return whole, blocks, odd


class PagedCacheMachine(RuleBasedStateMachine):
  """Random allocate / append / free against a NumPy model of every live sequence."""

  def __init__(self):
    super().__init__()
    self.cache = PagedKVCache(SLOTS, MAXLEN, KV, HD, num_pages=POOL, tokens_per_page=TPP)
    self.model: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> K, V [n, KV, HD]

  def _grow(self, slot: int, count: int, seed: int) -> None:
    """Reserve + write `count` more tokens; on an expected failure check nothing changed."""
    old_k, old_v = self.model.get(slot, (np.zeros((0, KV, HD), np.float32),) * 2)
    start = old_k.shape[0]
    before = tables(self.cache)
    free = self.cache.num_free_pages()
    extra = math.ceil((start + count) / TPP) - math.ceil(start / TPP)
    if start + count > MAXLEN or extra > free:
      with pytest.raises(ValueError, match="max_length" if start + count > MAXLEN else "num_pages"):
        self.cache.reserve(slot, start + count)
      assert_unchanged(self.cache, before)
      return
    self.cache.reserve(slot, start + count)
    rng = np.random.default_rng(seed)
    new_k, new_v = rng.standard_normal((2, count, KV, HD)).astype(np.float32)
    key = np.zeros((1, MAXLEN, KV, HD), np.float32)
    value = np.zeros_like(key)
    key[0, :count], value[0, :count] = new_k, new_v
    positions = start + np.arange(MAXLEN, dtype=np.int32)[None]  # [1, MAXLEN]
    valid = np.arange(MAXLEN)[None] < count
    _write(self.cache, jnp.array([slot], jnp.int32), jnp.asarray(key), jnp.asarray(value),
           jnp.asarray(positions), jnp.asarray(valid), jnp.array([start + count], jnp.int32))
    self.model[slot] = (np.concatenate([old_k, new_k]), np.concatenate([old_v, new_v]))

  @precondition(lambda self: len(self.model) < SLOTS)
  @rule(data=st.data(), count=st.integers(1, MAXLEN), seed=st.integers(0, 2**16))
  def allocate(self, data, count, seed):
    slot = data.draw(st.sampled_from([s for s in range(SLOTS) if s not in self.model]))
    self._grow(slot, count, seed)

  @precondition(lambda self: bool(self.model))
  @rule(data=st.data(), count=st.integers(1, 3), seed=st.integers(0, 2**16))
  def append(self, data, count, seed):
    self._grow(data.draw(st.sampled_from(sorted(self.model))), count, seed)

  @precondition(lambda self: bool(self.model))
  @rule(data=st.data())
  def free(self, data):
    slot = data.draw(st.sampled_from(sorted(self.model)))
    self.cache.free(slot)
    del self.model[slot]

  @invariant()
  def contents_match_model(self):
    (key, value), blocks, (odd_k, odd_v) = jax.tree.map(np.asarray, _reads(self.cache))
    expect_k = np.zeros((SLOTS, self.cache.capacity, KV, HD), np.float32)
    expect_v = np.zeros_like(expect_k)
    for slot, (k, v) in self.model.items():
      expect_k[slot, :len(k)], expect_v[slot, :len(v)] = k, v
    # Exactly what was written, and zeros everywhere else (free slots included).
    np.testing.assert_array_equal(key, expect_k)
    np.testing.assert_array_equal(value, expect_v)
    for i, (block_k, block_v) in enumerate(blocks):
      np.testing.assert_array_equal(block_k, expect_k[:, i * TPP:(i + 1) * TPP])
      np.testing.assert_array_equal(block_v, expect_v[:, i * TPP:(i + 1) * TPP])
    np.testing.assert_array_equal(odd_k, expect_k[[2, 0], 3:9])
    np.testing.assert_array_equal(odd_v, expect_v[[2, 0], 3:9])
    lengths = [len(self.model[s][0]) if s in self.model else 0 for s in range(SLOTS)]
    np.testing.assert_array_equal(self.cache.lengths[...], lengths)

  @invariant()
  def pages_consistent(self):
    owner = np.asarray(self.cache.page_owner[...])
    table = np.asarray(self.cache.page_table[...])
    referenced = table[table >= 0]
    assert len(set(referenced.tolist())) == referenced.size  # a page in at most one table entry
    for slot in range(SLOTS):
      row = table[slot]
      assert np.all(owner[row[row >= 0]] == slot)  # rows only reference their own pages
      assert sorted(np.flatnonzero(owner == slot).tolist()) == sorted(row[row >= 0].tolist())
      length = len(self.model[slot][0]) if slot in self.model else 0
      assert len(self.cache.pages_of(slot)) == math.ceil(length / TPP)  # just enough pages
    owned = np.sum(owner >= 0)
    assert self.cache.num_free_pages() == np.sum(owner == -1) == POOL - owned


PagedCacheMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPagedCacheMachine = PagedCacheMachine.TestCase


# ---- 3. isolation -----------------------------------------------------------------

OPTIONS = KernelOptions(scale=0.5)


@nnx.jit
def _attend(cache, rows, q, k, v, valid):
  positions = step_positions(cache, rows, q.shape[1])  # [b, T]
  return cached_step(cache, rows, q, k, v, positions=positions, valid=valid, options=OPTIONS)


def _step(cache, rows, q, k, v, valid):
  """One jitted cached_step after reserving its pages on the host (what a serving loop does)."""
  cache.reserve_for_step(rows, np.asarray(valid).sum(1))
  return _attend(cache, rows, q, k, v, valid)


def _random_steps(seed, rows, prefill, decode_steps, heads=4, kv_heads=2, head_dim=4):
  """q, k, v, valid of a prefill (lengths `prefill` per row, right padded) and decode steps."""
  rng = np.random.default_rng(seed)
  batch, width = len(rows), max(prefill)
  steps = []
  for length, valid in [(width, np.arange(width)[None] < np.asarray(prefill)[:, None])] + [
      (1, np.ones((batch, 1), bool))] * decode_steps:
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, batch, length, kv_heads, head_dim)).astype(np.float32)
    steps.append(tuple(map(jnp.asarray, (q, k, v, valid))))
  return steps


def test_freed_pages_never_leak_to_the_next_sequence():
  secret_base = 1e4
  make = lambda: PagedKVCache(2, 16, 2, 4, num_pages=4, tokens_per_page=4)
  cache = make()
  # Sequence A in slot 0: 10 tokens of large distinct values.
  secrets = secret_base + np.arange(10 * 2 * 4, dtype=np.float32).reshape(1, 10, 2, 4)
  cache.reserve(0, 10)
  a_pages = cache.pages_of(0)
  positions = jnp.arange(10, dtype=jnp.int32)[None]
  cache.write(jnp.array([0]), jnp.asarray(secrets), -jnp.asarray(secrets), positions,
              positions >= 0, jnp.array([10]))
  assert np.abs(np.asarray(cache.read_all(jnp.float32)[0])).max() >= secret_base
  cache.free(0)

  # Sequence B in slot 1 on the recycled pages, and the same B on a fresh cache.
  fresh = make()
  rows = jnp.array([1], jnp.int32)
  outputs, fresh_outputs = [], []
  for q, k, v, valid in _random_steps(0, [1], prefill=[7], decode_steps=2):
    outputs.append(np.asarray(_step(cache, rows, q, k, v, valid)))
    fresh_outputs.append(np.asarray(_step(fresh, rows, q, k, v, valid)))
  assert set(cache.pages_of(1)) & set(a_pages), "B should reuse A's pages"
  for out, ref in zip(outputs, fresh_outputs):
    np.testing.assert_array_equal(out, ref)  # bit-identical: A cannot influence B
  for part, ref in zip(cache.read_all(jnp.float32), fresh.read_all(jnp.float32)):
    part = np.asarray(part)
    assert not np.isin(np.abs(part), secrets).any() and np.abs(part).max() < secret_base
    np.testing.assert_array_equal(part, np.asarray(ref))
  # Defence 2: the pool itself holds no trace of A (free zeroed the pages).
  np.testing.assert_array_equal(cache.key_pages[...], fresh.key_pages[...])
  np.testing.assert_array_equal(cache.value_pages[...], fresh.value_pages[...])


@pytest.mark.parametrize("quant", [None, KVQuant("int8", "dkv")], ids=["bf", "int8"])
def test_free_clears_the_pool_in_place(quant):
  """An eager free rewrites the pools in place (donated): a copy would need a second pool's
  worth of device memory for the moment. Only the freed pages change."""
  cache = PagedKVCache(2, 16, 2, 4, num_pages=8, tokens_per_page=4, quant=quant)
  for slot in (0, 1):
    cache.reserve(slot, 8)
  ones = jnp.ones((2, 8, 2, 4), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  cache.write(jnp.arange(2), ones, ones, positions, positions >= 0, jnp.full((2,), 8))
  kept, freed = cache.pages_of(1), cache.pages_of(0)
  before = [cache.key_pages[...], cache.value_pages[...]]
  kept_before = np.asarray(before[0])[kept]
  cache.free(0)
  assert all(old.is_deleted() for old in before)  # donated, not copied
  np.testing.assert_array_equal(np.asarray(cache.key_pages[...])[freed], 0)
  np.testing.assert_array_equal(np.asarray(cache.key_pages[...])[kept], kept_before)
  np.testing.assert_array_equal(cache.lengths[...], [0, 8])


def test_reads_and_writes_are_confined_to_owned_pages():
  """Defence 1: even a page table pointing at another slot's page exposes nothing."""
  cache = PagedKVCache(2, 8, 1, 2, num_pages=4, tokens_per_page=2)
  cache.reserve(0, 4)  # pages 0, 1
  cache.reserve(1, 2)  # page 2
  secret = jnp.full((1, 4, 1, 2), 1e4, jnp.float32)
  positions = jnp.arange(4, dtype=jnp.int32)[None]
  cache.write(jnp.array([0]), secret, secret, positions, positions >= 0, jnp.array([4]))
  # Corrupt slot 1's table: its second page entry names slot 0's page 1.
  cache.page_table[...] = cache.page_table[...].at[1, 1].set(1)
  cache.lengths[...] = cache.lengths[...].at[1].set(4)
  key, value = cache.read_block(jnp.array([1]), 0, 4, jnp.float32)
  np.testing.assert_array_equal(key, 0.0)
  np.testing.assert_array_equal(value, 0.0)
  np.testing.assert_array_equal(cache.entry_positions(jnp.array([4]), rows=jnp.array([0])),
                                [[0, 1, 2, 3, -1, -1, -1, -1]])
  # A write through the corrupt entry is dropped; slot 0 keeps its data.
  cache.write(jnp.array([1]), -secret, -secret, positions, positions >= 0, jnp.array([4]))
  np.testing.assert_array_equal(cache.read_block(jnp.array([0]), 0, 4, jnp.float32)[0], secret)
  np.testing.assert_array_equal(cache.read_block(jnp.array([1]), 0, 2, jnp.float32)[0],
                                -secret[:, :2])


def test_stale_entries_past_the_length_are_masked():
  """Even stale data inside a page the slot owns (past its length) never reaches attention."""
  make = lambda: PagedKVCache(1, 8, 2, 4, num_pages=2, tokens_per_page=4)
  cache, fresh = make(), make()
  steps = _random_steps(1, [0], prefill=[3], decode_steps=1)
  rows = jnp.array([0], jnp.int32)
  q, k, v, valid = steps[0]
  _step(cache, rows, q, k, v, valid)
  _step(fresh, rows, q, k, v, valid)
  cache.reserve(0, 8)
  fresh.reserve(0, 8)
  # Plant garbage at entries 5..7 (past the length 3, and past the decode token at 3).
  for name in ("key_pages", "value_pages"):
    pool = getattr(cache, name)
    pool[...] = pool[...].at[1, 1:].set(1e4).at[0, 3].set(-1e4)
  q, k, v, valid = steps[1]
  np.testing.assert_array_equal(_step(cache, rows, q, k, v, valid), _step(fresh, rows, q, k, v, valid))


# ---- 4. parity with the contiguous KVCache ----------------------------------------


@pytest.mark.parametrize("quant", [None, KVQuant("int8")], ids=["f32", "int8"])
def test_attention_matches_contiguous_cache(quant):
  batch, max_length, tpp = 3, 16, 4
  prefill = [6, 3, 5]  # ragged rows, right padded
  paged = PagedKVCache(batch, max_length, 2, 8, num_pages=14, tokens_per_page=tpp, quant=quant)
  contiguous = KVCache(batch, max_length, 2, 8, quant=quant)
  # Pages handed out page by page in a shuffled slot order: non-contiguous per slot.
  rng = np.random.default_rng(3)
  picks = rng.permutation(sum([[s] * math.ceil(n / tpp) for s, n in enumerate(prefill)], []))
  held = [0] * batch
  for slot in picks:
    held[slot] += tpp
    paged.reserve(int(slot), held[slot])
  assert any(np.any(np.diff(paged.pages_of(s)) != 1) for s in range(batch))

  rows = jnp.arange(batch, dtype=jnp.int32)
  steps = _random_steps(4, list(range(batch)), prefill, decode_steps=3, heads=4, kv_heads=2,
                        head_dim=8)
  for i, (q, k, v, valid) in enumerate(steps):
    out = _step(paged, rows, q, k, v, valid)  # reserve_for_step, then the jitted step
    ref = _attend(contiguous, rows, q, k, v, valid)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(paged.lengths[...], [9, 6, 8])
  np.testing.assert_array_equal(paged.lengths[...], contiguous.lengths[...])
  for mine, theirs in zip(paged.read_all(jnp.float32), contiguous.read_all(jnp.float32)):
    np.testing.assert_array_equal(mine, theirs)  # the same (de)quantized entries


def test_insert_from_contiguous_cache():
  source = KVCache(2, 8, 2, 4)
  rng = np.random.default_rng(5)
  k, v = rng.standard_normal((2, 2, 8, 2, 4)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  source.write(jnp.arange(2), jnp.asarray(k), jnp.asarray(v), positions, positions < 6,
               jnp.array([6, 6]))
  cache = PagedKVCache(2, 8, 2, 4, num_pages=3, tokens_per_page=4)
  cache.reserve(1, 8)  # slot 1 holds an old sequence
  cache.insert(1, source, source_slot=0)
  assert len(cache.pages_of(1)) == 2 and int(cache.lengths[...][1]) == 6
  key, value = cache.read_all(jnp.float32)
  np.testing.assert_array_equal(key[1, :6], k[0, :6])
  np.testing.assert_array_equal(value[1, :8], np.concatenate([v[0, :6], np.zeros((2, 2, 4))]))
  before = tables(cache)
  with pytest.raises(ValueError, match="num_pages=3"):
    cache.insert(0, source, source_slot=1)  # 2 pages needed, 1 free
  assert_unchanged(cache, before)


# ---- sharding -------------------------------------------------------------------


def test_pools_shard_by_heads_never_by_batch():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("cache_batch", "data"), ("cache_heads", "tensor"))
  cache = PagedKVCache(4, 8, 2, 4, num_pages=8, tokens_per_page=4, mesh=mesh, rules=rules,
                       quant=KVQuant("int8"))
  assert cache.key_pages[...].sharding.spec == PartitionSpec(None, None, "tensor", None)
  assert cache.key_scale[...].sharding.spec == PartitionSpec(None, None, "tensor")
  assert cache.page_table[...].sharding.spec == PartitionSpec("data", None)
  assert cache.lengths[...].sharding.spec == PartitionSpec("data")
  rows = jnp.arange(4, dtype=jnp.int32)
  q, k, v, valid = _random_steps(6, list(range(4)), [3, 1, 2, 4], decode_steps=0)[0]
  out = _step(cache, rows, q, k, v, valid)
  assert out.shape == (4, 4, 4, 4) and np.all(np.isfinite(out))
  cache.free(1)
  assert cache.num_free_pages() == 5
