"""Every host-side slot argument of every cache kind goes through one check
(step_checks.slot_ids via CacheBase.check_slots): integers only (Python ints, NumPy /
JAX integer arrays), in [0, batch_size), and no slot twice where a call names several
for one purpose (insert, reserve_for_step). A bad argument raises an error naming it,
with the cache unchanged; a float is never truncated onto another slot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache import KVCache, LinearStateCache, PagedKVCache, page_plan
from meshattn.kvcache.step_checks import StepRejected

B, MAX_LEN, K, H = 4, 8, 1, 4
FILLED = np.array([3, 5, 2, 4])  # each slot's length after `_filled`


def _filled(kind: str):
  """A cache of `kind` with a sequence in every slot (lengths FILLED), and a source cache
  of the same batch with sequences in its slots 0 and 1."""
  if kind == "state":
    cache, source = LinearStateCache(B, MAX_LEN, K, H), LinearStateCache(B, MAX_LEN, K, H)
    for target, lengths in ((cache, FILLED), (source, [6, 1, 0, 0])):
      kv = jnp.arange(B * K * H * H, dtype=jnp.float32).reshape(B, K, H, H)  # [B, K, Hk, Hv]
      target.write(jnp.arange(B), kv + 1, jnp.ones((B, K, H)), jnp.ones((B,), bool),
                   jnp.asarray(lengths, jnp.int32))
    return cache, source
  source = KVCache(B, MAX_LEN, K, H)
  positions = jnp.broadcast_to(jnp.arange(MAX_LEN, dtype=jnp.int32), (B, MAX_LEN))  # [B, T]
  x = jnp.arange(B * MAX_LEN * K * H, dtype=jnp.float32).reshape(B, MAX_LEN, K, H) + 1
  source.write(jnp.arange(B), x, -x, positions, positions < FILLED[:, None], jnp.asarray(FILLED))
  if kind == "contiguous":
    cache = KVCache(B, MAX_LEN, K, H)
  else:
    cache = PagedKVCache(B, MAX_LEN, K, H, num_pages=12, tokens_per_page=4)
  cache.insert(np.arange(B), source, np.arange(B))
  return cache, source


def _state(cache) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(cache))]


KINDS = ["contiguous", "paged", "state"]
# (method, call with the argument under test, its name as the method calls it, kinds)
CALLS = [
    ("reset", lambda c, s, v: c.reset(v), "slot", KINDS),
    ("insert", lambda c, s, v: c.insert(v, s, np.zeros(np.shape(v), int)), "slot", KINDS),
    ("insert", lambda c, s, v: c.insert(np.arange(np.size(v)), s, v), "source_slot", KINDS),
    ("reserve", lambda c, s, v: c.reserve(v, 4), "slot", ["paged"]),
    ("reserve_for_step", lambda c, s, v: c.reserve_for_step(v, 1), "slots", ["paged"]),
    ("free", lambda c, s, v: c.free(v), "slot", ["paged"]),
    ("pages_of", lambda c, s, v: c.pages_of(v), "slot", ["paged"]),
]
CASES = [pytest.param(kind, method, call, name, id=f"{kind}-{method}-{name}")
         for method, call, name, kinds in CALLS for kind in kinds]

NOT_INTEGERS = [1.5, 2.7, np.float32(1.0), [0, 1.9], jnp.array([1.0]), True, np.array([False]),
                jnp.array([True]), "a", None]
OUT_OF_RANGE = [B, -1, [0, B + 3], np.array([2**63], np.uint64), jnp.array([-2], jnp.int32)]


@pytest.mark.parametrize("kind, method, call, name", CASES)
def test_bad_slot_arguments_are_refused_naming_them_with_nothing_changed(kind, method, call, name):
  cache, source = _filled(kind)
  before = _state(cache)
  for value in NOT_INTEGERS:
    with pytest.raises(ValueError, match=rf"\.{method}: {name} must be integers \(a Python int"):
      call(cache, source, value)
  for value in OUT_OF_RANGE:
    with pytest.raises(StepRejected, match=rf"\.{method}: .*{name} \[-?\d+.*\] out of range; "
                                           rf"slots must be in \[0, {B}\)"):
      call(cache, source, value)
  after = _state(cache)
  assert all(np.array_equal(a, b) for a, b in zip(before, after)), value


@pytest.mark.parametrize("kind", KINDS)
def test_a_slot_named_twice_is_refused_where_it_would_conflict(kind):
  cache, source = _filled(kind)
  before = _state(cache)
  calls = [lambda: cache.insert(np.array([2, 2], np.int32), source, [0, 1])]
  if kind == "paged":
    calls.append(lambda: cache.reserve_for_step(jnp.array([3, 1, 3]), 1))
  for call in calls:
    with pytest.raises(StepRejected, match=r"slots? \[(2|3)\] named twice.*at most once"):
      call()
  assert all(np.array_equal(a, b) for a, b in zip(before, _state(cache)))
  # Emptying a slot twice is still one emptying (reset / free are idempotent).
  cache.reset([2, 0, 2])
  np.testing.assert_array_equal(np.asarray(cache.lengths[...]), [0, 5, 0, 4])


@pytest.mark.parametrize("kind", KINDS)
def test_integer_slots_of_every_form_still_work(kind):
  cache, source = _filled(kind)
  cache.reset(np.int32(1))
  cache.reset(jnp.array([3], jnp.int32))
  cache.reset([])  # nothing to reset
  np.testing.assert_array_equal(np.asarray(cache.lengths[...]), [3, 0, 2, 0])
  cache.insert(np.array([1, 3], np.uint8), source, jnp.array([0, 0]))
  want = [6, 6] if kind == "state" else FILLED[[0, 0]]
  np.testing.assert_array_equal(np.asarray(cache.lengths[...])[[1, 3]], want)
  if kind == "paged":
    cache.reserve_for_step(np.array([0, 2], np.int64), [1, 2])
    assert cache.pages_of(np.int16(2)) == cache.pages_of(2) and len(cache.pages_of(2)) == 1


def test_the_engine_page_tables_take_the_same_check():
  with pytest.raises(ValueError, match=r"EnginePages: slot must be integers"):
    page_plan.as_slots([1.9], 3, "EnginePages")
  with pytest.raises(ValueError, match=r"EnginePages: slots must be integers"):
    page_plan.as_slots(np.array([True]), 3, "EnginePages", "slots")
  np.testing.assert_array_equal(page_plan.as_slots([], 3, "EnginePages"), np.zeros((0,), int))
  np.testing.assert_array_equal(page_plan.as_slots([2, 2], 3, "EnginePages"), [2, 2])


def test_traced_slots_must_be_integers_too():
  cache, _ = _filled("contiguous")
  with pytest.raises(ValueError, match=r"KVCache\.reset: slot must be integers, got a traced"):
    nnx.jit(lambda c, rows: c.reset(rows))(cache, jnp.array([1.0]))


@pytest.mark.parametrize("kind", ["contiguous", "state"])
@pytest.mark.parametrize("rows", [[9], [-1], [4, 1]])
def test_a_traced_reset_with_a_slot_out_of_range_changes_nothing_and_is_reported(kind, rows):
  """Inside a compiled step a reset cannot raise: it records the rejection (the host raises
  after the step) and clears no row, not even the valid ones beside the bad one."""
  from meshattn.layers.serving import jit_step

  class Holder(nnx.Module):
    def __init__(self, cache):
      self.cache = cache

  cache, _ = _filled(kind)
  holder = Holder(cache)
  before = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(cache))]
  with pytest.raises(StepRejected, match="slot index out of range"):
    jit_step(lambda m, r: m.cache.reset(r))(holder, jnp.asarray(rows, jnp.int32))
  after = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(cache))]
  assert all(np.array_equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("kind", ["contiguous", "paged", "state"])
def test_insert_from_a_source_of_another_entry_shape_is_refused(kind):
  """One check for every kind (CacheBase.check_insert_rows): the source's entries must have
  this cache's shape, named, before any change."""
  cache, _ = _filled(kind)
  before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(cache))]
  wider = (LinearStateCache(B, MAX_LEN, K, 2 * H) if kind == "state"
           else KVCache(B, MAX_LEN, K, 2 * H))
  with pytest.raises(ValueError, match=rf"{type(cache).__name__}\.insert: the source "
                                       rf"{type(wider).__name__} has \{{'num_kv_heads': {K}, "
                                       rf"'head_dim': {2 * H}"):
    cache.insert(0, wider, 0)
  for a, b in zip(before, jax.tree.leaves(nnx.state(cache))):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("call, name", [
    (lambda c: c.reserve(0, 4.9), "num_tokens"), (lambda c: c.reserve(0, "5"), "num_tokens"),
    (lambda c: c.reserve(0, True), "num_tokens"), (lambda c: c.reserve(0, None), "num_tokens"),
    (lambda c: c.reserve_for_step([0, 1], 1.5), "tokens_per_row"),
    (lambda c: c.reserve_for_step([0, 1], [1, 2, 3]), "tokens_per_row"),
])
def test_token_counts_of_reserve_are_integers_named(call, name):
  """A float count is not truncated (4.9 reserved for 4 tokens), nor a str / bool read as one."""
  cache = PagedKVCache(B, MAX_LEN, K, H, num_pages=12, tokens_per_page=4)
  before = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(cache))]
  with pytest.raises(ValueError, match=name):
    call(cache)
  after = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(cache))]
  assert all(np.array_equal(b, a) for b, a in zip(before, after))
  cache.reserve_for_step([0, 1], np.array([5, 1]))  # ints, one per slot: served
  assert (np.asarray(cache.page_owner[...]) >= 0).sum() == 3
