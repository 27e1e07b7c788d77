"""The multi-step decode pattern docs/serving.md shows: only the cache carried through a
`lax.scan`, the weights cast once before it; it must decode exactly as step-by-step
`jit_step` calls do, leave the layer usable, and still report a rejected step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step, raise_if_rejected
from meshattn.layers.step_inputs import host_raises_after_step


def _decode_steps(attn):
  graphdef, params, cache_state = nnx.split(attn, nnx.Param, ...)

  @functools.partial(jax.jit, donate_argnums=1)
  def run(params, cache_state, xs):  # xs [steps, B, 1, D]
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)  # once, not per step

    def body(cache_state, x):
      model = nnx.merge(graphdef, params, cache_state)
      y = model(x, model_mode="autoregressive")
      return nnx.state(model, nnx.Not(nnx.Param)), y

    with host_raises_after_step():
      return jax.lax.scan(body, cache_state, xs)

  return params, cache_state, run


def test_scanned_decode_equals_step_by_step_and_reports_rejections():
  config = load_config("tiny")
  models = [Attention(config, rngs=nnx.Rngs(0)) for _ in range(2)]
  step = jit_step(lambda m, x, mode: m(x, model_mode=mode), static_argnames="mode")
  prompt = jax.random.normal(jax.random.key(0), (2, 4, config.emb_dim))  # [B, T, D]
  xs = jax.random.normal(jax.random.key(1), (3, 2, 1, config.emb_dim))  # [steps, B, 1, D]
  for model in models:
    model.init_cache(2, 8)
    step(model, prompt, "prefill")
  scanned, reference = models

  params, cache_state, run = _decode_steps(scanned)
  cache_state, ys = run(params, cache_state, xs)  # [steps, B, 1, D]
  nnx.update(scanned, cache_state)
  raise_if_rejected(scanned)
  want = np.stack([np.asarray(step(reference, x, "autoregressive")) for x in xs])
  np.testing.assert_allclose(ys, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(scanned.cache.lengths[...], [7, 7])

  # Two more steps: the second would pass max_length 8, is rejected and writes nothing.
  params, cache_state, run = _decode_steps(scanned)
  cache_state, _ = run(params, cache_state, xs[:2])
  nnx.update(scanned, cache_state)
  with pytest.raises(StepRejected, match="max_length"):
    raise_if_rejected(scanned)
  np.testing.assert_array_equal(scanned.cache.lengths[...], [8, 8])
  scanned.cache.reset([0, 1])  # and the layer serves on, as a fresh one does
  fresh = Attention(config, rngs=nnx.Rngs(0))
  fresh.init_cache(2, 8)
  np.testing.assert_allclose(step(scanned, prompt, "prefill"), step(fresh, prompt, "prefill"),
                             rtol=1e-6, atol=1e-6)
