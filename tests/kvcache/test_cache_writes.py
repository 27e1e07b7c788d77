"""The contiguous cache's fast host and step paths against the general ones they replace:
a prefill's write as one slice write per row (`run=True`) against the scatter of single
tokens, and `reset` of concrete slots as one slice write per row against the scatter that
traced slots take. Results must be identical, entry for entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import meshattn.kvcache.cache as cache_module
from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.quant import KVQuant
from meshattn.kvcache.step_checks import Rejection

B, C, K, H = 4, 8, 2, 3
ORDERS = [(0, 1, 2, 3), (0, 2, 1, 3), (2, 0, 1, 3), (1, 2, 0, 3)]


def _filled(order, quant, seed=0):
  """A cache whose every entry holds a distinct random value (a stale entry shows)."""
  cache = KVCache(B, C, K, H, axis_order=order, quant=quant)
  rng = np.random.default_rng(seed)
  key = jnp.asarray(rng.normal(size=(B, C, K, H)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
  cache.write(jnp.arange(B, dtype=jnp.int32), key, -key, positions, jnp.ones((B, C), bool),
              jnp.full((B,), 3, jnp.int32))
  return cache


def _state(cache) -> dict:
  return {"/".join(map(str, path)): np.asarray(variable.get_value())
          for path, variable in nnx.to_flat_state(nnx.state(cache))}


@pytest.mark.parametrize("quant", [None, KVQuant("int8", "dkv")], ids=["bf", "int8"])
@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", ["mixed", "edges"])
def test_run_write_equals_the_token_scatter(order, quant, jit, case, monkeypatch):
  monkeypatch.setattr(cache_module, "_RUN_MIN_TOKENS", 2)
  runs = _count_run_writes(monkeypatch)
  t = 3
  if case == "mixed":
    # Rows: a middle start; start 0 with padding; a slot out of range (dropped); a start
    # whose window passes the end (shifted back), one token kept.
    rows, start, kept = [2, 0, 7, 3], [4, 0, 1, 6], [3, 2, 3, 1]
  else:
    # A negative start (its first tokens dropped, none written twice); valid tokens past
    # the capacity (dropped); a start at the capacity (a full slot: nothing written); a
    # negative row (dropped).
    rows, start, kept = [1, 2, 0, -1], [-2, 7, C, 2], [3, 3, 2, 3]
  rows, start, kept = (jnp.asarray(x, jnp.int32) for x in (rows, start, kept))
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [b, T]
  valid = jnp.arange(t)[None] < kept[:, None]  # [b, T]
  rng = np.random.default_rng(1)
  key = jnp.asarray(rng.normal(size=(4, t, K, H)), jnp.float32)
  new_lengths = start + kept

  def write(cache, run):
    cache.write(rows, key, 2 * key, positions, valid, new_lengths, run=run)

  results = []
  for run in (True, False):  # the slice writes run for run=True only
    cache = _filled(order, quant)
    (nnx.jit(write, static_argnums=1, donate_argnums=0) if jit else write)(cache, run)
    results.append(_state(cache))
  for name in results[1]:
    np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)
  before = _state(_filled(order, quant))
  assert not np.array_equal(before["key"], results[0]["key"])  # the write did write
  assert runs == [2], runs  # K and V took the slice writes (one traced / eager call each)


def _count_run_writes(monkeypatch) -> list:
  """A list whose one entry counts the slice writes traced (or run eagerly) so far."""
  calls = [0]
  original = KVCache._run_write

  def counted(self, *args):
    calls[0] += 1
    return original(self, *args)

  monkeypatch.setattr(KVCache, "_run_write", counted)
  return calls


def test_run_write_covers_a_whole_slot_and_leaves_other_slots(monkeypatch):
  monkeypatch.setattr(cache_module, "_RUN_MIN_TOKENS", 2)
  cache = _filled((0, 1, 2, 3), None)
  before = _state(cache)
  new = jnp.full((1, C, K, H), 5.0)
  positions = jnp.arange(C, dtype=jnp.int32)[None]
  cache.write(jnp.asarray([1]), new, new, positions, jnp.ones((1, C), bool),
              jnp.asarray([C]), run=True)
  after = _state(cache)
  np.testing.assert_array_equal(after["key"][1], 5.0)
  for slot in (0, 2, 3):
    np.testing.assert_array_equal(after["key"][slot], before["key"][slot])


def test_run_write_is_not_taken_for_a_ring_a_decode_token_or_a_sharded_batch():
  takes = lambda cache, length, rows=B: cache._writes_runs(cache.key[...], rows, length)
  assert takes(KVCache(B, 1024, K, H), 512)
  assert not takes(KVCache(B, 1024, K, H), 1)  # one token per row: the scatter
  assert not takes(KVCache(B, 1024, K, H), 256)  # short rows: the scatter is cheaper
  assert not takes(KVCache(B, 1024, K, H), 512, rows=65)  # rows are unrolled: bounded
  assert not takes(KVCache(B, 1024, K, H, window=512), 512)  # a ring wraps
  assert not takes(KVCache(B, 256, K, H), 512)  # longer than the slot
  cpus = jax.devices("cpu")
  if len(cpus) < 2:
    pytest.skip("needs 2 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  mesh = jax.sharding.Mesh(np.asarray(cpus[:2]), ("data",))
  sharded = KVCache(B, 1024, K, H, mesh=mesh, rules=(("cache_batch", "data"),))
  assert len(sharded.key[...].sharding.device_set) == 2
  assert not takes(sharded, 512)
  traced = []
  jax.jit(lambda k: traced.append(sharded._writes_runs(k, B, 512)) or k)(sharded.key[...])
  assert traced == [False]


@pytest.mark.parametrize("quant", [None, KVQuant("int8", "heads_and_dkv")], ids=["bf", "int8"])
@pytest.mark.parametrize("order", ORDERS[:3], ids=str)
def test_reset_of_concrete_slots_equals_the_traced_scatter(order, quant):
  slots = np.asarray([3, 1, 3])  # a slot named twice is cleared once, as by the scatter
  eager = _filled(order, quant)
  eager.reset(slots)
  traced = _filled(order, quant)
  nnx.jit(lambda cache, rows: cache.reset(rows), donate_argnums=0)(traced, jnp.asarray(slots))
  got, want = _state(eager), _state(traced)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  before = _state(_filled(order, quant))
  logical = lambda stored: np.transpose(stored, np.argsort(order))  # [B, C, K, H]
  np.testing.assert_array_equal(logical(got["key"])[[1, 3]], 0)
  np.testing.assert_array_equal(logical(got["key"])[[0, 2]], logical(before["key"])[[0, 2]])
  np.testing.assert_array_equal(got["lengths"], [3, 0, 3, 0])


def test_reset_refuses_bad_slots_before_any_change():
  cache = _filled((0, 1, 2, 3), None)
  before = _state(cache)
  with pytest.raises(ValueError, match="out of range"):
    cache.reset([1, 4])
  with pytest.raises(ValueError, match="integers"):
    cache.reset([1.9])
  cache.reset([])  # no finished slot: nothing to do
  # Traced, a slot out of range (a negative one too) is dropped, never wrapped onto a slot,
  # and recorded for the host to raise (jit_step does: tests/kvcache/test_slot_arguments.py).
  nnx.jit(lambda cache, rows: cache.reset(rows), donate_argnums=0)(cache, jnp.asarray([-1, B]))
  after = _state(cache)
  assert int(after.pop("rejected")) == Rejection.SLOT_OUT_OF_RANGE
  for name in after:
    np.testing.assert_array_equal(after[name], before[name])


@pytest.mark.parametrize("extra", [(), ("quantize_kvcache=true", "kv_quant_dtype=int8")],
                         ids=["bf", "int8"])
def test_layer_serves_the_same_with_slice_writes(extra, monkeypatch):
  """The layer through jit_step: a padded prefill, a continued chunk, a reset slot refilled
  and decode steps; slice writes (threshold 2 tokens) against the token scatter."""
  from meshattn.configs import load_config
  from meshattn.layers import Attention
  from meshattn.layers.serving import jit_step

  config = load_config("tiny", *extra)
  x = jax.random.normal(jax.random.key(0), (2, 9, config.emb_dim), jnp.float32)  # [B, T, D]
  seg = jnp.asarray([[1] * 5 + [0], [1] * 6], jnp.int32)  # row 0 right-padded

  def serve(threshold):
    monkeypatch.setattr(cache_module, "_RUN_MIN_TOKENS", threshold)
    model = Attention(config, rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 12)
    step = jit_step(lambda m, x, seg, mode, slots=None: m(
        x, decoder_segment_ids=seg, model_mode=mode, slots=slots), static_argnames="mode")
    outs = [step(model, x[:, :6], seg, "prefill")]
    outs.append(step(model, x[:, 6:8], None, "prefill"))
    cache.reset(0)
    outs.append(step(model, x[:1, :4], None, "prefill", slots=jnp.asarray([0])))
    outs += [step(model, x[:, 8:9], None, "autoregressive") for _ in range(2)]
    return [np.asarray(o) for o in outs], _state(cache)

  runs = _count_run_writes(monkeypatch)
  got, got_state = serve(2)
  assert runs[0] > 0  # the layer's prefill steps took the slice writes
  want, want_state = serve(10**6)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  for name in want_state:
    np.testing.assert_array_equal(got_state[name], want_state[name], err_msg=name)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_insert_writes_the_cache_in_place(paged):
  """insert (host side, between steps) donates the cache to its write: an eager write would
  hold a second cache's worth of device memory for the moment."""
  from meshattn.kvcache.paged import PagedKVCache
  source = _filled((0, 1, 2, 3), None)
  cache = (PagedKVCache(B, C, K, H, num_pages=8, tokens_per_page=4) if paged
           else KVCache(B, C, K, H))
  pools = ("key_pages", "value_pages") if paged else ("key", "value")
  before = [getattr(cache, name)[...] for name in pools]
  cache.insert(2, source, 1)
  assert all(old.is_deleted() for old in before)
  got_k, got_v = cache.read_block(jnp.asarray([2]), 0, 3, jnp.float32)  # [1, 3, K, H]
  want_k, want_v = source.read_block(jnp.asarray([1]), 0, 3, jnp.float32)
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
  np.testing.assert_array_equal(cache.lengths[...], [0, 0, 3, 0])
