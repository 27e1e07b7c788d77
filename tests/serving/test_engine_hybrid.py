"""The serving engine over a hybrid model: linear-attention layers (a LinearStateCache, a
state per slot, no pages) beside paged softmax layers, in the same compiled steps.

As in test_engine.py, every output must equal the uncached greedy decode of its prompt
alone: prompts longer than the chunk continue their slots' states chunk by chunk, mixed
steps gate the rows that do not decode, and with more requests than slots a reused slot
must start from a zero state (a state left behind would change every later token).
The engine runs sharded (data 2 x fsdp 2 x tensor 2), the reference on one device.
"""

import numpy as np
import pytest
from flax import nnx

from helpers.greedy import ENGINE_MESH, ENGINE_MODEL, greedy_case
from meshattn.configs import load_config
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.state import LinearStateCache
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine

OVERRIDES = (*ENGINE_MODEL, "attention_layer_pattern=[linear,global]",
             "linear_decay_per_head=[0.9,0.8]", "linear_attention_chunk_size=4",
             "attention_output_gate=elementwise")
MESH = ENGINE_MESH
PROMPTS = [11, 3, 9, 6, 13]  # lengths; chunk 5: 13 -> 5 + 5 + 3
MAX_NEW = [4, 6, 3, 5, 4]


def test_hybrid_engine_equals_uncached_greedy_decode():
  _, _, model, prompts, want = greedy_case(OVERRIDES, MESH, PROMPTS, MAX_NEW, seed=5,
                                           prompt_seed=1)
  engine = Engine(model, num_slots=2, chunk_size=5, prefill_rows=1, specialize=False)
  assert [type(c) for c in engine.caches] == [LinearStateCache, PagedKVCache]
  assert engine.warmup() > 0  # scratch requests through both cache kinds, then forgotten
  assert not engine.results() and engine.idle
  assert not np.asarray(engine.caches[0].kv[...]).any()
  for i in range(2):
    engine.submit(prompts[i], MAX_NEW[i], id=i)
  arrivals = {2: 1, 3: 3, 4: 4}  # request -> step after which it arrives (mid-flight)
  steps = 0
  while not engine.idle or steps <= max(arrivals.values()):
    engine.step()
    steps += 1
    for rid, at in arrivals.items():
      if at == steps:
        engine.submit(prompts[rid], MAX_NEW[rid], id=rid)
  results = engine.results()
  for rid, tokens in enumerate(want):
    assert results[rid].tokens == tokens, (rid, results[rid].tokens, tokens)
  assert max(s.running for s in engine.steps) == 2  # slots were shared and reused
  assert any(s.chunk_rows and s.decode_rows for s in engine.steps)  # mixed steps ran
  state, paged = engine.caches
  # every finished request's state was forgotten; every page went back
  assert not np.asarray(state.kv[...]).any() and not np.asarray(state.norm[...]).any()
  assert not np.asarray(state.lengths[...]).any()
  assert paged.num_free_pages() == paged.num_pages


def test_engine_needs_a_paged_layer():
  """The scheduler's page budget comes from the softmax layers' pools: a model of linear
  layers only is refused, naming the cache kinds, before any cache is built (the model
  keeps the caches it had)."""
  cfg = load_config("tiny-lm", *OVERRIDES[:-4], "attention_layer_pattern=[linear]",
                    num_devices=1)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  kept = model.init_cache(3, 16)
  with pytest.raises(ValueError, match=r"at least one paged\), got \['LinearStateCache'\]"):
    Engine(model, num_slots=2, chunk_size=4)
  assert all(a is b for a, b in zip(model.caches(), kept, strict=True))
