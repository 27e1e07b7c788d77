"""Invisible values never reach visible outputs, compiled on a GPU (issue 14, part 2).

tests/layers/test_invisible_values.py checks every kernel function on CPU, where the Pallas GPU
kernel runs in the Pallas interpreter and jax.nn's XLA path stands in for cuDNN. This file runs
the layer on a GPU with `attention: flash`, so the compiled Triton / cuDNN kernels serve it:
padding tokens (segment 0, or hidden by a user mask) carry NaN / +inf inputs, and the real
tokens' outputs and input gradients must equal those of the same call with finite padding.
Skipped off the GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.layers import Attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled GPU kernels")

B, T, D = 2, 128, 256
# Row 0: two packed documents and right padding; row 1: left padding.
SEGMENTS = np.zeros((B, T), np.int32)
SEGMENTS[0, :50], SEGMENTS[0, 50:112] = 1, 2
SEGMENTS[1, 16:] = 1
PAD = SEGMENTS == 0  # [B, T]


def _poisoned(x):
  """x [B, T, D] with NaN in row 0's padding and +inf in row 1's."""
  bad = np.where(np.arange(B)[:, None] == 0, np.nan, np.inf)[:, :, None]  # [B, 1, 1]
  return jnp.where(jnp.asarray(PAD)[:, :, None], jnp.asarray(bad, x.dtype), x)


@pytest.mark.parametrize("how", ["segments-sinks", "user-mask"])
def test_compiled_gpu_kernels_keep_padding_values_out(how):
  sinks = how == "segments-sinks"
  model = Attention(emb_dim=D, num_query_heads=8, num_kv_heads=2, head_dim=64, attention="flash",
                    attention_sink=sinks, dtype="bfloat16", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.bfloat16)  # [B, T, D]
  cot = jnp.where(jnp.asarray(PAD)[:, :, None], 0.0,
                  jax.random.normal(jax.random.key(2), (B, T, D))).astype(jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS)
  same_doc = (SEGMENTS[:, :, None] == SEGMENTS[:, None, :]) & ~PAD[:, :, None]  # [B, T, S]
  user_mask = jnp.asarray(same_doc & np.tril(np.ones((T, T), bool)))[:, None]  # [B, 1, T, S]

  @nnx.jit
  def run(model, x):
    def call(x):
      if sinks:
        return model(x, decoder_segment_ids=seg)
      return model(x, mask=user_mask)
    out, vjp = jax.vjp(call, x)
    return out, vjp(cot)[0]

  clean_out, clean_dx = run(model, x)
  out, dx = run(model, _poisoned(x))
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_array_equal(f32(out)[~PAD], f32(clean_out)[~PAD])
  assert np.isfinite(f32(dx)[~PAD]).all()
  np.testing.assert_array_equal(f32(dx)[~PAD], f32(clean_dx)[~PAD])
