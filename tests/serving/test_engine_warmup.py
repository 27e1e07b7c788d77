"""Engine.warmup leaves no scratch request behind, even when a scratch step fails."""

import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine

OVERRIDES = ("emb_dim=16", "mlp_dim=32", "num_query_heads=2", "num_kv_heads=1", "head_dim=8",
             "num_decoder_layers=1", "vocab_size=40", "max_target_length=32",
             "max_prefill_predict_length=32", "paged_kv_cache=true", "tokens_per_page=4",
             "num_pages=8")


def test_a_failing_scratch_step_leaves_the_engine_empty(monkeypatch):
  model = Decoder(load_config("tiny-lm", *OVERRIDES), rngs=nnx.Rngs(0))
  engine = Engine(model, num_slots=2, chunk_size=4, specialize=False)
  real_step, calls = engine.step, []

  def failing_step():
    calls.append(1)
    if len(calls) == 3:  # after the scratch requests hold slots and pages
      raise RuntimeError("a kernel failed on its first run")
    return real_step()

  monkeypatch.setattr(engine, "step", failing_step)
  with pytest.raises(RuntimeError, match="first run"):
    engine.warmup()
  assert engine.idle and not engine.results() and not engine.steps
  assert engine.scheduler.pages_reserved() == 0
  for cache in engine.caches:
    assert cache.num_free_pages() == cache.num_pages
    assert not np.asarray(cache.lengths[...]).any()
  monkeypatch.undo()
  assert engine.submit(np.array([1, 2, 3], np.int32), 2) == 0  # ids start again at 0
  while not engine.idle:
    engine.step()
  assert len(engine.results()[0].tokens) == 2
