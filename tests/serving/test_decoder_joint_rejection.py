"""A model step that one layer's cache refuses changes no layer's cache (eager and under
jit_step): every layer is checked before any layer writes (decoder.plan_model_step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers.serving import jit_step
from tests.helpers.greedy import ENGINE_MODEL, build_decoder


def _arrays(cache):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(cache)]


def _unchanged(before, caches):
  return all(len(b) == len(a) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(b, a))
             for b, a in zip(before, [_arrays(c) for c in caches]))


@pytest.mark.parametrize("pattern, reserve_first", [
    ("[linear,global]", False),  # the state layer would advance; the paged one refuses
    ("[global,global]", True),   # pages reserved (per layer) on layer 0 only
])
@pytest.mark.parametrize("jitted", [False, True])
def test_a_step_one_layer_refuses_writes_in_none(pattern, reserve_first, jitted):
  _, model = build_decoder(ENGINE_MODEL + (f"attention_layer_pattern={pattern}",), sharded=False)
  caches = model.init_cache(2, 32, paged=True)
  if reserve_first:
    caches[0].reserve_for_step([0, 1], 3)
  tokens = segment_ids = jnp.ones((2, 3), jnp.int32)  # [B, T]
  step = (jit_step(lambda m, t, s: m(t, None, s, model_mode="prefill")) if jitted
          else lambda m, t, s: m(t, None, s, model_mode="prefill"))
  before = [_arrays(c) for c in caches]
  with pytest.raises(StepRejected, match="not reserved"):
    step(model, tokens, segment_ids)
  assert _unchanged(before, caches)
  for cache in caches:  # served once every layer can take it
    if hasattr(cache, "reserve_for_step"):
      cache.reserve_for_step([0, 1], 3)
  step(model, tokens, segment_ids)
  assert all(np.asarray(c.lengths[...]).tolist() == [3, 3] for c in caches)
