"""jit_step(check=False): a rejection is reported at the next raise_if_rejected, however
many good steps came after it, and only once."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step, raise_if_rejected


def test_a_rejection_survives_later_good_steps_until_checked():
  attn = Attention(emb_dim=16, num_query_heads=2, head_dim=8, rngs=nnx.Rngs(0))
  attn.init_cache(2, 3)
  prefill = jit_step(lambda m, x, slots: m(x, model_mode="prefill", slots=slots))
  decode = jit_step(lambda m, x, slots: m(x, model_mode="autoregressive", slots=slots),
                    check=False)
  prefill(attn, jnp.ones((2, 2, 16)), jnp.array([0, 1]))
  x = jnp.ones((1, 1, 16))
  decode(attn, x, jnp.array([0]))  # slot 0 now full (3 tokens)
  decode(attn, x, jnp.array([0]))  # rejected: past max_length; writes nothing
  decode(attn, x, jnp.array([1]))  # a good step on slot 1 afterwards
  np.testing.assert_array_equal(attn.cache.lengths[...], [3, 3])
  with pytest.raises(StepRejected, match="max_length"):
    raise_if_rejected(attn)
  raise_if_rejected(attn)  # reported once: the bits were cleared
  with pytest.raises(StepRejected, match="max_length"):  # a checked step still raises
    jit_step(lambda m, x, slots: m(x, model_mode="autoregressive", slots=slots))(
        attn, x, jnp.array([1]))
  raise_if_rejected(attn)
