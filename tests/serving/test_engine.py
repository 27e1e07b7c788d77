"""The serving engine's outputs equal a plain uncached greedy decode of each prompt.

Requests of different lengths arrive before and during the run; prompts
longer than the chunk are prefilled in several chunks interleaved with the
decode steps of running requests (mixed steps); more requests than slots,
so slots and pages are reused. Every output must equal what the train-mode
forward gives when called on the growing sequence alone (argmax, append,
repeat): nothing that shared a batch, a step or a page may change it.
The engine runs sharded on the 8-device mesh (data 2 x fsdp 2 x tensor 2),
the reference on one device, with the same parameters.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers.greedy import ENGINE_MESH, ENGINE_MODEL, build_decoder, greedy_case
from meshattn.layers.engine import Engine

OVERRIDES = (*ENGINE_MODEL,
             # Gemma-2-style alternation: layer 0 sees the last 5 keys (shorter than the longer
             # prompts and their chunks), layer 1 everything
             "attention_layer_pattern=[local_sliding,global]", "sliding_window_size=5")
PROMPTS = [11, 3, 17, 6, 9, 14]  # lengths; chunk 6: 17 -> 6 + 6 + 5
MAX_NEW = [5, 7, 3, 6, 4, 5]


MESH = ENGINE_MESH


def build(sharded: bool):
  return build_decoder(OVERRIDES, sharded=sharded, mesh_overrides=MESH, seed=3)


def test_engine_equals_uncached_greedy_decode():
  _, reference, model, prompts, want = greedy_case(OVERRIDES, MESH, PROMPTS, MAX_NEW, seed=3,
                                                   prompt_seed=0)
  same = jax.tree.map(np.array_equal, nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))
  assert all(jax.tree.leaves(same))
  assert len(model.embedding[...].sharding.device_set) == 8
  engine = Engine(model, num_slots=3, chunk_size=6, prefill_rows=2)
  # warmup serves scratch requests (to run each kernel once) and must leave no trace of them
  assert engine.warmup() > 0
  assert not engine.results() and not engine.steps and engine.idle
  for cache in engine.caches:
    assert cache.num_free_pages() == cache.num_pages
    assert not np.asarray(cache.lengths[...]).any()
    assert not np.asarray(cache.key_pages[...]).any()
  for i in range(2):
    engine.submit(prompts[i], MAX_NEW[i], id=i)
  arrivals = {2: 1, 3: 2, 4: 3, 5: 6}  # request -> step after which it arrives (mid-flight)
  steps = 0
  while not engine.idle or steps <= max(arrivals.values()):
    engine.step()
    steps += 1
    # the caches' page managers hold exactly what the scheduler reserved, in every layer
    free = {c.num_free_pages() for c in engine.caches}
    assert free == {engine.num_pages - engine.scheduler.pages_reserved()}
    for rid, at in arrivals.items():
      if at == steps:
        engine.submit(prompts[rid], MAX_NEW[rid], id=rid)
  results = engine.results()
  assert sorted(results) == list(range(len(PROMPTS)))
  for rid, tokens in enumerate(want):
    assert results[rid].tokens == tokens, (rid, results[rid].tokens, tokens)
    assert results[rid].finish_reason == "length"
  kinds = {s.kind for s in engine.steps}
  assert kinds == {"chunk", "mixed", "decode"}, kinds  # the schedule exercised every kind
  assert max(s.chunk_rows for s in engine.steps) == 2
  assert max(s.running for s in engine.steps) == 3  # every slot held at once
  # every page went back, in every layer, zeroed (no request's K/V left in the pool)
  for cache in engine.caches:
    assert cache.num_free_pages() == cache.num_pages
    assert not np.asarray(cache.key_pages[...]).any() and not np.asarray(cache.value_pages[...]).any()
    assert not np.asarray(cache.lengths[...]).any()
  assert engine.scheduler.pages_reserved() == 0


def test_engine_refuses_bad_settings_and_requests_before_any_change():
  cfg, model = build(sharded=False)
  with pytest.raises(ValueError, match="chunk_size=64 exceeds .*max_prefill_predict_length=32"):
    Engine(model, num_slots=2, chunk_size=64)
  with pytest.raises(ValueError, match="prefill_rows=3 must be <= num_slots=2"):
    Engine(model, num_slots=2, chunk_size=8, prefill_rows=3)
  # Named before the model's caches are rebuilt (2.5 failed at the first step, "2" raw).
  for kw, name in ((dict(chunk_size=2.5), "chunk_size"), (dict(num_slots="2"), "num_slots"),
                   (dict(num_slots=2.5), "num_slots"), (dict(prefill_rows=True), "prefill_rows"),
                   (dict(end_token=1.5), "end_token"), (dict(end_token=-7), "end_token"),
                   (dict(end_token=cfg.vocab_size), "end_token")):
    with pytest.raises(ValueError, match=f"Engine: {name} must be"):
      Engine(model, **{"num_slots": 2, "chunk_size": 8, **kw})
  assert list(model.caches()) == [None, None]  # no cache was built
  engine = Engine(model, num_slots=2, chunk_size=8)
  with pytest.raises(ValueError, match="exceed the cache's max_length=32"):
    engine.submit(np.ones(30, np.int32), max_new_tokens=4)
  with pytest.raises(ValueError, match="integer token ids"):
    engine.submit(np.ones(3, np.float32), max_new_tokens=4)
  with pytest.raises(ValueError, match="request 0: prompt must be .* integer token ids"):
    engine.submit([[1, 2], [3]], max_new_tokens=4)  # ragged: not one sequence
  with pytest.raises(ValueError, match="Engine.run takes Request objects"):
    engine.run([(np.ones(3, np.int32), 2)])
  prompt = np.ones(3, np.int32)
  engine.submit(prompt, max_new_tokens=2, id=5)
  prompt[:] = 7  # the caller reuses its buffer: the queued request keeps what was submitted
  with pytest.raises(ValueError, match="id 5 was already submitted"):
    engine.submit(np.ones(3, np.int32), max_new_tokens=2, id=5)
  assert len(engine.scheduler.waiting) == 1 and engine.scheduler.running == {}
  np.testing.assert_array_equal(engine.scheduler.waiting[0].prompt, [1, 1, 1])
