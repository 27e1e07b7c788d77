"""The engine's host page tables never reach a device by reference (issue 17).

On the CPU backend `jax.device_put` of a suitably aligned NumPy array may make
no copy: the device buffer is the host memory. EnginePages writes its host
tables in place (reserve / release) while a step dispatched earlier may not
have run yet, so a table handed over by reference changes under that step
(seen as `StepRejected: tokens would land in pages that are not reserved` in
`make demo`). Whether malloc's address is aligned enough is luck, so these
tests move the host tables into page-aligned buffers first: then the zero-copy
path is taken on every run, and the bug shows deterministically.

The engine runs sharded on data 2 x fsdp 2 x tensor 2, so its page table is
split by slot rows, the layout of the failing demo runs.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine
from meshattn.sharding import create_mesh, shard_module

OVERRIDES = ("emb_dim=16", "mlp_dim=32", "num_query_heads=2", "num_kv_heads=2", "head_dim=8",
             "num_decoder_layers=2", "vocab_size=40", "max_target_length=32",
             "max_prefill_predict_length=32", "paged_kv_cache=true", "tokens_per_page=4",
             "num_pages=24", "ici_data_parallelism=2", "ici_fsdp_parallelism=2",
             "ici_tensor_parallelism=2")
NUM_SLOTS = 4  # one slot row per shard of the page table [S, M]


def sharded_model():
  cfg = load_config("tiny-lm", *OVERRIDES)
  mesh = create_mesh(cfg)
  model = Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(5))
  shard_module(model, mesh, model.rules)
  return model


def page_aligned(host: np.ndarray) -> np.ndarray:
  """A copy of `host` whose buffer starts on a 4096-byte boundary, so the CPU runtime places
  it without copying: replicated, and every shard that starts 64-byte aligned (slot rows 0
  and 2 of the [4, 8] int32 table here; jaxlib 0.10 on CPU)."""
  raw = np.empty(host.nbytes + 4096, np.uint8)
  start = -raw.ctypes.data % 4096
  out = raw[start:start + host.nbytes].view(host.dtype).reshape(host.shape)
  out[...] = host
  return out


def with_aligned_tables(engine: Engine) -> Engine:
  """The engine's host tables moved (same values) into page-aligned buffers."""
  engine.pages.table = page_aligned(engine.pages.table)  # [S, M]
  engine.pages.owner = page_aligned(engine.pages.owner)  # [P]
  return engine


def shares_host_memory(array: jax.Array, host: np.ndarray) -> bool:
  """Whether any shard of `array` lives inside `host`'s buffer."""
  low, high = host.ctypes.data, host.ctypes.data + host.nbytes
  return any(low <= s.data.unsafe_buffer_pointer() < high for s in array.addressable_shards)


def test_push_hands_the_devices_snapshots_not_the_host_tables():
  model = sharded_model()
  engine = with_aligned_tables(Engine(model, num_slots=NUM_SLOTS, chunk_size=4, specialize=False))
  pages = engine.pages
  assert len(pages._table_sharding.device_set) == 8
  probe = jax.device_put(pages.table, pages._table_sharding)
  if not shares_host_memory(probe, pages.table):
    pytest.skip("this runtime copies every host array: the hazard cannot occur here")

  handed, apply = [], pages._apply

  def recording_apply(model, table, owner, freed, released):
    handed.append((table, owner, freed, released))
    return apply(model, table, owner, freed, released)

  pages._apply = recording_apply
  pages.reserve([0, 1, 2], [9, 5, 4])
  pages.push(model)
  pushed_table, pushed_owner = pages.table.copy(), pages.owner.copy()  # [S, M], [P]
  table, owner, freed, released = handed[-1]
  assert not shares_host_memory(table, pages.table)
  assert not shares_host_memory(owner, pages.owner)
  assert not np.shares_memory(freed, pages._freed)
  assert not np.shares_memory(released, pages._released)

  # What the engine does next, while a dispatched step may still read the pushed tables.
  pages.release([0, 2])
  pages.reserve([3], [12])  # takes the pages slot 0 had
  assert (pages.table[[0, 2, 3]] != pushed_table[[0, 2, 3]]).any(axis=1).all()
  np.testing.assert_array_equal(np.asarray(table), pushed_table)
  np.testing.assert_array_equal(np.asarray(owner), pushed_owner)
  for cache in engine.caches:
    np.testing.assert_array_equal(np.asarray(cache.page_table[...]), pushed_table)
    np.testing.assert_array_equal(np.asarray(cache.page_owner[...]), pushed_owner)

  pages.push(model)  # the release's mask reaches the caches once, then starts empty
  assert handed[-1][2].sum() == 4 and handed[-1][3].tolist() == [True, False, True, False]
  assert not pages._freed.any() and not pages._released.any()
  for cache in engine.caches:
    np.testing.assert_array_equal(np.asarray(cache.page_table[...]), pages.table)
    assert cache.num_free_pages() == int(np.sum(pages.owner == -1))


def test_a_request_stops_at_its_end_token_inside_the_engine():
  """Overlapped steps with aligned host tables: a request that samples `end_token` stops
  there (the token kept), the row already planned after it is dropped without a rejection,
  its pages go back; the others are unchanged up to their own end_token, if any."""
  model = sharded_model()
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, 40, n).astype(np.int32) for n in (5, 7, 3)]
  max_new = 8

  def serve(end_token=None):
    engine = with_aligned_tables(Engine(model, num_slots=NUM_SLOTS, chunk_size=4,
                                        specialize=False, end_token=end_token))
    for rid, prompt in enumerate(prompts):
      engine.submit(prompt, max_new, id=rid)
    while not engine.idle:
      engine.step()
    return engine, engine.results()

  _, free_run = serve()
  assert all(len(r.tokens) == max_new and r.finish_reason == "length" for r in free_run.values())
  # A token a decode row (index >= 1) samples for the first time in its request, so the
  # stop comes from a decode step while the next step, planned before it, is in flight.
  firsts = [(i, rid) for rid, r in free_run.items() for i in range(1, max_new - 1)
            if r.tokens[i] not in r.tokens[:i]]
  assert firsts, "every request repeats its first token: pick other prompts or weights"
  i, rid = min(firsts)
  end_token = free_run[rid].tokens[i]

  engine, results = serve(end_token)
  assert results[rid].tokens == free_run[rid].tokens[:i + 1]
  for rid, result in results.items():  # each cut at its own first end_token, if it samples one
    tokens = free_run[rid].tokens
    cut = tokens.index(end_token) + 1 if end_token in tokens else max_new
    assert result.tokens == tokens[:cut]
    assert result.finish_reason == ("end_token" if end_token in tokens else "length")
  assert engine.scheduler.pages_reserved() == 0
  for cache in engine.caches:
    assert cache.num_free_pages() == cache.num_pages
    assert not np.asarray(cache.lengths[...]).any()
