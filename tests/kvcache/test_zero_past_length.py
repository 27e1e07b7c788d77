"""The contiguous cache's invariant: a slot's entries at or past its length hold zeros.

The split chunk path reads a contiguous cache in place (layers/prefill_split.py,
`reads_in_place`) and lets cuDNN multiply masked entries' zero weights by their values,
so it relies on this: the cache is created zeroed, `reset` / `insert` clear the slot,
writes land below the new length, padding tokens (a NaN in a padding input included)
are never written, and a rejected step writes nothing. Checked after every operation of
a serving sequence through the layer, for slice writes and token scatters, plain and
int8 caches (whose cleared entries dequantize to zero).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import meshattn.kvcache.cache as cache_module
from meshattn.kvcache.quant import KVQuant
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step

B, MAX_LEN, D = 3, 12, 32


@jit_step
def prefill(model, x, seg, slots=None):
  return model(x, decoder_segment_ids=seg, model_mode="prefill", slots=slots)


@jit_step
def decode(model, x):
  return model(x, model_mode="autoregressive")


def assert_zero_past_lengths(cache, when: str) -> None:
  lengths = np.asarray(cache.lengths[...])  # [B]
  key, value = cache.read_block(None, 0, cache.capacity, jnp.float32)  # [B, C, K, H]
  past = np.arange(cache.capacity)[None, :] >= lengths[:, None]  # [B, C]
  for name, x in (("key", key), ("value", value)):
    stale = np.asarray(x)[past]
    assert np.all(stale == 0.0), f"after {when}: {name} entries past the lengths {lengths} hold {stale[stale != 0][:4]}"


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "int8"])
@pytest.mark.parametrize("run_min_tokens", [2, 10 ** 9], ids=["slices", "scatter"])
def test_entries_past_each_length_stay_zero(quantized, run_min_tokens, monkeypatch):
  monkeypatch.setattr(cache_module, "_RUN_MIN_TOKENS", run_min_tokens)
  kw = dict(kv_quant=KVQuant("int8")) if quantized else {}
  model = Attention(emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8,
                    decode_attention="dot_product", rngs=nnx.Rngs(0), **kw)
  cache = model.init_cache(B, MAX_LEN)
  assert_zero_past_lengths(cache, "init_cache")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, 10, D)), jnp.float32)
  # A ragged prompt whose padding inputs are NaN: the padding is never written.
  seg = jnp.array([[1] * 4, [1, 1, 0, 0], [0] * 4], jnp.int32)
  prefill(model, jnp.where(seg[..., None] == 0, jnp.nan, x[:, :4]), seg)
  assert_zero_past_lengths(cache, "a padded prefill")
  prefill(model, x[:, 4:7], jnp.array([[1, 1, 0], [1] * 3, [1, 0, 0]], jnp.int32))
  assert_zero_past_lengths(cache, "a chunk continuing the slots")
  decode(model, x[:, 7:8])
  assert_zero_past_lengths(cache, "a decode step")
  with pytest.raises(StepRejected):  # slot 0 holds 7: 7 + 6 > 12
    prefill(model, x[:, :6], jnp.ones((B, 6), jnp.int32))
  assert_zero_past_lengths(cache, "a rejected step")
  cache.reset([0, 2])
  assert_zero_past_lengths(cache, "reset")
  source = Attention(emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8,
                     rngs=nnx.Rngs(1), **kw)
  source.init_cache(1, MAX_LEN, for_prefill=True)
  prefill(source, x[:1, :2], jnp.ones((1, 2), jnp.int32))
  cache.insert(1, source.cache, 0)  # a shorter sequence over a longer one: its tail cleared
  assert_zero_past_lengths(cache, "insert")
  np.testing.assert_array_equal(cache.lengths[...], [0, 2, 0])


def test_insert_refuses_one_slot_named_twice():
  """Two sequences inserted into one slot would leave the first one's tail past the second's
  length (and break the zeros the split chunk path relies on): refused, nothing changed, for
  every cache kind."""
  from meshattn.kvcache import KVCache, PagedKVCache
  from meshattn.kvcache.state import LinearStateCache
  source = KVCache(2, 8, 1, 4)
  k = jnp.ones((2, 5, 1, 4))
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  source.write(jnp.arange(2, dtype=jnp.int32), k, k, positions,
               jnp.array([[True] * 5, [True, True, False, False, False]]), jnp.array([5, 2]))
  targets = [KVCache(2, 8, 1, 4), PagedKVCache(2, 8, 1, 4, num_pages=8, tokens_per_page=4)]
  for cache in targets:
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(cache))]
    with pytest.raises(StepRejected, match="at most once"):
      cache.insert([0, 0], source, [0, 1])
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(cache))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), type(cache).__name__
    with pytest.raises(ValueError, match="2 slots but 1 source"):
      cache.insert([0, 1], source, [0])
  state = LinearStateCache(2, 8, 1, 4)
  with pytest.raises(StepRejected, match="at most once"):
    state.insert([1, 1], LinearStateCache(2, 8, 1, 4), [0, 1])


def test_insert_of_a_slot_into_itself_keeps_it():
  """The source may be the cache itself: its entries are read before the slot is cleared."""
  from meshattn.kvcache import KVCache, PagedKVCache
  k = jnp.arange(2 * 5 * 4, dtype=jnp.float32).reshape(2, 5, 1, 4) + 1.0
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  for cache in (KVCache(2, 8, 1, 4), PagedKVCache(2, 8, 1, 4, num_pages=8, tokens_per_page=4)):
    if isinstance(cache, PagedKVCache):
      cache.reserve_for_step(np.arange(2), 5)
    cache.write(jnp.arange(2, dtype=jnp.int32), k, -k, positions,
                jnp.array([[True] * 5, [True] * 3 + [False] * 2]), jnp.array([5, 3]))
    before = [np.asarray(x) for x in cache.read_all(jnp.float32)]
    cache.insert(1, cache, 1)
    after = [np.asarray(x) for x in cache.read_all(jnp.float32)]
    np.testing.assert_array_equal(cache.lengths[...], [5, 3])
    for a, b in zip(after, before):
      np.testing.assert_array_equal(a[:, :5], b[:, :5], err_msg=type(cache).__name__)
