"""Quantized KV on activations with outlier channels (issue 14, part 6).

Real LLM keys carry a few channels far larger than the rest. With one input
feature scaled x20 the per-token int8 / int4 scales used to be set by the
outlier (int8 decode erred 4.5% of max |ref|, int4 72%); the layer now works
in a rotated basis whenever the cache is quantized (kvcache.quant). The stated
bounds (docs/quantization.md: int8 < 2e-2, int4 < 0.25, as RMS and max ratios,
for the typical draw; int8's RMS ratio for every draw measured) are checked on
8 draws, and the max ratio on the reference, ragged and paged paths for one
draw. Also: an outlier channel placed directly in K (after the projection) and
the rotation itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache import KVQuant
from meshattn.kvcache.quant import from_cache_basis, rotation, to_cache_basis
from meshattn.layers import Attention
from meshattn.scripts import kv_quant_error

BOUND = {"int8": 2e-2, "int4": 0.25}
EMB, PROMPT, TOTAL = 64, 6, 10


def rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


def outlier_inputs(batch=2):
  x = jax.random.normal(jax.random.key(0), (batch, TOTAL, EMB))
  return x.at[..., 5].multiply(20.0)  # one outlier input feature


def serve(model, x, paged):
  cache = model.init_cache(x.shape[0], TOTAL)
  rows = np.arange(x.shape[0])
  if paged:
    cache.reserve_for_step(rows, TOTAL)
  outs = [model(x[:, :PROMPT], model_mode="prefill")]
  for t in range(PROMPT, TOTAL):
    outs.append(model(x[:, t:t + 1], model_mode="autoregressive"))
  return jnp.concatenate(outs, axis=1)


# Each path with one dtype (the key-channel test below runs both on the reference path).
@pytest.mark.parametrize("dtype,decode,paged,axis", [
    ("int4", "dot_product", False, "dkv"), ("int8", "ragged", False, "dkv"),
    ("int4", "ragged", False, "dkv"), ("int8", "paged", True, "dkv"),
    ("int4", "paged", True, "dkv"), ("int8", "ragged", False, "heads_and_dkv"),
    ("int4", "dot_product", False, "heads_and_dkv")])
def test_bounds_hold_with_an_outlier_input_feature(dtype, decode, paged, axis):
  """Every path, both dtypes, and one scale per token (heads_and_dkv) as well as per token
  and head: the stated bounds assume either."""
  extra = dict(paged_kv_cache=True, num_pages=8, tokens_per_page=4) if paged else {}
  model = Attention(emb_dim=EMB, num_query_heads=4, num_kv_heads=2, head_dim=32,
                    kv_quant=KVQuant(dtype, axis), decode_attention=decode, rngs=nnx.Rngs(1),
                    **extra)
  x = outlier_inputs()
  want = model(x)  # train forward: no cache, no quantization
  assert rel(serve(model, x, paged), want) < BOUND[dtype]


# RMS error over RMS reference, every seed; the max-error bound above for the median seed.
RMS_BOUND = {"int8": 2e-2, "int4": 0.25}
SEEDS = range(8)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_bounds_over_seeds(dtype):
  """The stated bounds are about the distribution over models and inputs, not one draw: the
  max-error ratio of one small output is noisy (over 192 draws, int8: median 0.008, worst
  0.044; int4: median 0.15, worst 1.10; scripts/kv_quant_error.py), the RMS ratio less so.
  These 8 draws are checked draw by draw for the RMS ratio (int4's worst over 192 was 0.32:
  the doc states int4 for the typical draw) and by their median for the max ratio."""
  draws = np.array([kv_quant_error.errors(dtype, seed, "dkv") for seed in SEEDS])  # [8, 2]
  assert (draws[:, 0] < RMS_BOUND[dtype]).all(), draws[:, 0]
  assert np.median(draws[:, 1]) < BOUND[dtype], draws[:, 1]


def test_an_outlier_key_channel():
  """A channel of K itself 20x the rest (a k-projection column scaled), int8 and int4."""
  for dtype in BOUND:
    model = Attention(emb_dim=EMB, num_query_heads=4, num_kv_heads=2, head_dim=32,
                      kv_quant=KVQuant(dtype), rngs=nnx.Rngs(2))
    kernel = model.key.kernel[...]
    model.key.kernel[...] = kernel.at[:, :, 7].multiply(20.0)  # [D, K, H]: channel 7
    x = jax.random.normal(jax.random.key(3), (2, TOTAL, EMB))
    assert rel(serve(model, x, False), model(x)) < BOUND[dtype], dtype


@pytest.mark.parametrize("head_dim", [16, 24, 128])
def test_rotation_is_orthogonal_and_round_trips(head_dim):
  r = rotation(head_dim)
  np.testing.assert_allclose(r @ r.T, np.eye(head_dim), atol=1e-12)
  x = jax.random.normal(jax.random.key(4), (2, 3, head_dim))
  quant = KVQuant("int8")
  np.testing.assert_allclose(from_cache_basis(to_cache_basis(x, quant), quant), x, atol=1e-5)
  assert to_cache_basis(x, None) is x  # an unquantized cache stores the plain basis
