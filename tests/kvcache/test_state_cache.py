"""LinearStateCache: slot semantics of the KV caches (reset, insert, lengths, rejected steps),
placement by logical names (kv heads over `tensor`), and a prefill that continues slots from
their state plus decode steps equal to one pass over the whole sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.kernel_checks import rel_err
from helpers.linear_np import linear_attention_np
from meshattn.kvcache.state import LinearStateCache
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers.linear import LinearSpec, linear_cached_step
from meshattn.sharding import create_mesh

K, H = 2, 4


def _filled(cache, rows, seed):
  rng = np.random.default_rng(seed)
  b = len(rows)
  cache.write(jnp.asarray(rows), jnp.asarray(rng.normal(size=(b, K, H, H)), jnp.float32),
              jnp.asarray(rng.normal(size=(b, K, H)), jnp.float32), jnp.ones((b,), bool),
              jnp.asarray([3] * b, jnp.int32))


def _refused_unchanged(cache, error, match, call):
  """call() raises error (matching match) and leaves every array of cache as it was."""
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(cache))]
  with pytest.raises(error, match=match):
    call()
  after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(cache))]
  assert len(after) == len(before)
  for a, b in zip(after, before):
    np.testing.assert_array_equal(a, b)


def test_reset_insert_and_rejections():
  cache = LinearStateCache(4, 8, K, H)
  _filled(cache, [1, 2], seed=0)
  before = np.asarray(cache.kv[...])
  cache.reset(1)
  assert np.all(np.asarray(cache.kv[...])[1] == 0) and np.all(np.asarray(cache.norm[...])[1] == 0)
  np.testing.assert_array_equal(np.asarray(cache.kv[...])[2], before[2])
  assert np.asarray(cache.lengths[...]).tolist() == [0, 0, 3, 0]
  source = LinearStateCache(2, 8, K, H)
  _filled(source, [1], seed=1)
  cache.insert(0, source, 1)
  np.testing.assert_array_equal(np.asarray(cache.kv[...])[0], np.asarray(source.kv[...])[1])
  assert np.asarray(cache.lengths[...]).tolist() == [3, 0, 3, 0]
  # Each refusal leaves the (filled) cache as it was.
  _refused_unchanged(cache, StepRejected, r"slots must be in \[0, 4\)", lambda: cache.reset(4))
  short = LinearStateCache(2, 2, K, H)
  _filled(short, [0, 1], seed=2)
  _refused_unchanged(short, StepRejected, "max_length=2", lambda: short.insert(0, source, 1))
  _refused_unchanged(cache, ValueError, "LinearStateCache", lambda: cache.insert(0, object(), 0))
  _refused_unchanged(cache, ValueError, r"source LinearStateCache has \{'num_kv_heads': 2, "
                     r"'head_dim': 8, 'value_dim': 8\}; this cache",
                     lambda: cache.insert(0, LinearStateCache(2, 8, K, 2 * H), 0))
  _refused_unchanged(cache, StepRejected, "at most once", lambda: cache.insert([2, 2], source,
                                                                             [0, 1]))
  # A write to a slot out of range is dropped, not wrapped onto another slot.
  kept = np.asarray(cache.kv[...])
  cache.write(jnp.asarray([7]), jnp.ones((1, K, H, H)), jnp.ones((1, K, H)), jnp.ones((1,), bool),
              jnp.asarray([1]))
  np.testing.assert_array_equal(np.asarray(cache.kv[...]), kept)


def test_state_is_placed_by_kv_heads():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = create_mesh({"mesh_axes": ("data", "tensor"), "ici_data_parallelism": 4,
                      "ici_tensor_parallelism": 2})
  rules = (("cache_batch", "data"), ("cache_heads", "tensor"))
  cache = LinearStateCache(4, 8, K, H, mesh=mesh, rules=rules)
  assert tuple(cache.kv[...].sharding.spec) == ("data", "tensor", None, None)
  assert tuple(cache.norm[...].sharding.spec) == ("data", "tensor", None)
  assert cache.kv.logical_axes == ("cache_batch", "cache_heads", "cache_kv", None)


def test_prefill_continuing_slots_and_decode_equal_one_pass():
  """Slot 2 takes a right-padded prompt, then a second prompt continues it, then two decode
  steps; slot 0 takes one prompt and decodes. A rejected step (valid all False) changes
  nothing. Every output equals the float64 form over the whole sequence."""
  spec = LinearSpec(chunk_size=2, decay=(0.9, 0.8))
  n, scale = 4, 0.5
  rng = np.random.default_rng(2)
  seqs = {s: [rng.normal(size=(9, m, H)).astype(np.float32) for m in (n, K, K)] for s in (0, 2)}
  cache = LinearStateCache(3, 16, K, H)
  step = jax.jit(lambda c, rows, q, k, v, valid: _step(c, rows, q, k, v, valid, spec, scale))
  outputs = {0: [], 2: []}

  def run(rows, spans, width):
    """Tokens spans[i] = (start, stop) of slot rows[i], right-padded to width."""
    arrays = []
    for part in range(3):
      arrays.append(np.stack([np.pad(seqs[r][part][a:b], [(0, width - (b - a)), (0, 0), (0, 0)])
                              for r, (a, b) in zip(rows, spans)]))
    valid = np.stack([np.arange(width) < b - a for a, b in spans])
    out, new_state = step(cache_state(), jnp.asarray(rows), *arrays, valid)
    load(new_state)
    for r, (a, b), o in zip(rows, spans, np.asarray(out)):
      outputs[r].append(o[:b - a])

  cache_state = lambda: (cache.kv[...], cache.norm[...], cache.lengths[...])

  def load(state):
    cache.kv[...], cache.norm[...], cache.lengths[...] = state

  run([2, 0], [(0, 3), (0, 5)], 5)  # slot 2 padded after 3 tokens
  run([2], [(3, 7)], 4)  # continues slot 2 from its state
  before = jax.tree.map(np.asarray, cache_state())
  out, state = step(cache_state(), jnp.asarray([0]), *[np.ones((1, 1, m, H), np.float32)
                                                      for m in (n, K, K)], np.zeros((1, 1), bool))
  assert np.all(np.asarray(out) == 0)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
  run([0, 2], [(5, 6), (7, 8)], 1)  # decode
  run([2, 0], [(8, 9), (6, 7)], 1)
  assert np.asarray(cache.lengths[...]).tolist() == [7, 0, 9]
  for slot, stop in ((0, 7), (2, 9)):
    q, k, v = (x[None, :stop] for x in seqs[slot])
    want = linear_attention_np(q, k, v, decay=spec.decay, scale=scale)[0]
    assert rel_err(np.concatenate(outputs[slot]), want) < 1e-5, slot


def _step(state, rows, q, k, v, valid, spec, scale):
  cache = LinearStateCache(3, 16, K, H)
  cache.kv[...], cache.norm[...], cache.lengths[...] = state
  out = linear_cached_step(cache, rows, q, k, v, valid=valid, spec=spec, scale=scale)
  return out, (cache.kv[...], cache.norm[...], cache.lengths[...])
