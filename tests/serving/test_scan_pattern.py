"""The multi-step decode pattern docs/serving.md shows: only the cache carried through a
`lax.scan`, the weight matrices cast to the compute dtype once before it (QK norm's scales
stay float32); it must decode as step-by-step `jit_step` calls do, leave the layer usable,
and still report a rejected step."""

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


def _decode_steps(attn, dtype):
  graphdef, params, cache_state = nnx.split(attn, nnx.Param, ...)

  @functools.partial(jax.jit, donate_argnums=1)
  def run(params, cache_state, xs):  # xs [steps, B, 1, D]
    # The weight matrices once, not per step; 1-D parameters (norm scales, sinks) stay: the
    # layer computes with them in float32.
    params = jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 else p, params)

    def body(cache_state, x):
      model = nnx.merge(graphdef, params, cache_state)
      y = model(x, model_mode="autoregressive")
      return nnx.state(model, nnx.Not(nnx.Param)), y

    with host_raises_after_step():
      return jax.lax.scan(body, cache_state, xs)

  return params, cache_state, run


# float32: the same arithmetic, so the same outputs; bfloat16 (the weights cast before the
# loop, inside the layer step by step): XLA fuses the two programs differently, one bf16 ulp.
TOLERANCE = {"float32": dict(rtol=1e-6, atol=1e-6), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scanned_decode_equals_step_by_step_and_reports_rejections(dtype):
  config = load_config("tiny", f"dtype={dtype}", "use_qk_norm=true")
  models = [Attention(config, rngs=nnx.Rngs(0)) for _ in range(2)]
  step = jit_step(lambda m, x, mode: m(x, model_mode=mode), static_argnames="mode")
  prompt = jax.random.normal(jax.random.key(0), (2, 4, config.emb_dim))  # [B, T, D]
  xs = jax.random.normal(jax.random.key(1), (3, 2, 1, config.emb_dim))  # [steps, B, 1, D]
  for model in models:
    model.init_cache(2, 8)
    step(model, prompt, "prefill")
  scanned, reference = models

  params, cache_state, run = _decode_steps(scanned, jnp.dtype(dtype))
  cache_state, ys = run(params, cache_state, xs)  # [steps, B, 1, D]
  nnx.update(scanned, cache_state)
  raise_if_rejected(scanned)
  want = np.stack([np.asarray(step(reference, x, "autoregressive")) for x in xs])
  np.testing.assert_allclose(np.asarray(ys, np.float32), want.astype(np.float32),
                             **TOLERANCE[dtype])
  np.testing.assert_array_equal(scanned.cache.lengths[...], [7, 7])

  # Two more steps: the second would pass max_length 8, is rejected and writes nothing.
  params, cache_state, run = _decode_steps(scanned, jnp.dtype(dtype))
  cache_state, _ = run(params, cache_state, xs[:2])
  nnx.update(scanned, cache_state)
  with pytest.raises(StepRejected, match="max_length"):
    raise_if_rejected(scanned)
  np.testing.assert_array_equal(scanned.cache.lengths[...], [8, 8])
  scanned.cache.reset([0, 1])  # and the layer serves on, as a fresh one does
  fresh = Attention(config, rngs=nnx.Rngs(0))
  fresh.init_cache(2, 8)
  np.testing.assert_array_equal(step(scanned, prompt, "prefill"), step(fresh, prompt, "prefill"))
