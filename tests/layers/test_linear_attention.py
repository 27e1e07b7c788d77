"""Causal linear attention kernels (layers/linear): chunkwise == recurrent == the float64
masked quadratic form, with decay, GQA / MQA, packed rows and padding; gradients against
central differences of the float64 form; invisible values never reach visible outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.kernel_checks import rel_err
from helpers.linear_np import linear_attention_np
from meshattn.layers.linear import LinearSpec, LinearState, linear_attention, linear_attention_step

B, T, H = 2, 11, 8
SCALE = H ** -0.5
# Row 0: three packed sequences and right padding; row 1: left padding, one sequence.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
                     [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)  # [B, T]


def _qkv(n, k, seed=0, t=T):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, t, n, H)).astype(np.float32)  # [B, T, N, H]
  key = rng.normal(size=(B, t, k, H)).astype(np.float32)  # [B, T, K, H]
  v = rng.normal(size=(B, t, k, H)).astype(np.float32)  # [B, T, K, H]
  return q, key, v


def _reference(spec, q, k, v, segments=None):
  return linear_attention_np(q, k, v, feature_map=spec.feature_map, decay=spec.decay,
                             normalize=spec.normalize, scale=SCALE, segment_ids=segments)


CASES = [  # (spec, query heads, kv heads); chunk 4 does not divide T = 11, chunk 11 is T
    (LinearSpec(chunk_size=4), 4, 2),
    (LinearSpec(chunk_size=3, feature_map="silu", decay=0.9, normalize=False), 4, 1),
    (LinearSpec(chunk_size=11, feature_map="relu", decay=(0.5, 0.95, 0.8, 1.0)), 4, 4),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=["gqa", "mqa-silu-decay", "mha-per-head"])
def test_chunkwise_matches_quadratic(case):
  spec, n, k = CASES[case]
  q, key, v = _qkv(n, k, seed=case)
  run = jax.jit(lambda q, k, v, seg: linear_attention(q, k, v, spec=spec, scale=SCALE,
                                                      segment_ids=seg)[0])
  for segments in (None, SEGMENTS):
    got = run(q, key, v, segments)
    assert rel_err(got, _reference(spec, q, key, v, segments)) < 1e-5, segments


def test_recurrent_matches_chunkwise_and_quadratic():
  """Token by token through the decode step (state reset where a packed sequence starts)
  equals the chunkwise form and the reference; so do the final states."""
  spec, n, k = CASES[2]
  q, key, v = _qkv(n, k, seed=5)
  starts = np.concatenate([np.ones((B, 1), bool), SEGMENTS[:, 1:] != SEGMENTS[:, :-1]], axis=1)
  # Padding is transparent: a token after padding continues the sequence before it.
  starts &= SEGMENTS != 0
  starts[1, 1] = False  # row 1: the first real token follows padding, with an empty state

  @jax.jit
  def recurrent(q, key, v):
    def token(state, xs):
      q_t, k_t, v_t, real, start = xs
      out, state = linear_attention_step(q_t, k_t, v_t, state, spec=spec, scale=SCALE,
                                         valid=real, continues=~start)
      return state, out
    xs = tuple(jnp.moveaxis(jnp.asarray(x), 1, 0) for x in (q, key, v, SEGMENTS != 0, starts))
    state, outs = jax.lax.scan(token, LinearState.zeros(B, k, H, H), xs)
    return jnp.moveaxis(outs, 0, 1), state

  got, state = recurrent(q, key, v)
  want = _reference(spec, q, key, v, SEGMENTS)
  assert rel_err(got, want) < 1e-5
  chunked, chunk_state = jax.jit(lambda q, k, v: linear_attention(
      q, k, v, spec=spec, scale=SCALE, segment_ids=SEGMENTS))(q, key, v)
  assert rel_err(chunked, want) < 1e-5
  assert rel_err(chunk_state.kv, state.kv) < 1e-5 and rel_err(chunk_state.norm, state.norm) < 1e-5


def test_continuing_from_a_state_equals_one_pass():
  """Prefill in two calls (the first right-padded, its state carried) == one call: the
  state after padding is the state after the last real token."""
  spec, n, k = LinearSpec(chunk_size=3, decay=(0.9, 0.6)), 4, 2
  q, key, v = _qkv(n, k, seed=7)
  lengths = np.array([5, 2])  # real tokens of each row in the first call (then padding)
  first_valid = np.arange(6)[None] < lengths[:, None]  # [B, 6]
  run = jax.jit(lambda q, k, v, valid, initial: linear_attention(
      q, k, v, spec=spec, scale=SCALE, valid=valid, initial=initial))
  out1, state = run(q[:, :6], key[:, :6], v[:, :6], first_valid, LinearState.zeros(B, k, H, H))
  # Row b continues with tokens lengths[b] .. lengths[b] + 4 of the sequence.
  take = lambda x: np.stack([x[b, lengths[b]:lengths[b] + 5] for b in range(B)])
  out2, _ = run(take(q), take(key), take(v), np.ones((B, 5), bool), state)
  whole = [_reference(spec, q[b:b + 1, :lengths[b] + 5], key[b:b + 1, :lengths[b] + 5],
                      v[b:b + 1, :lengths[b] + 5])[0] for b in range(B)]
  for b in range(B):
    assert rel_err(out1[b, :lengths[b]], whole[b][:lengths[b]]) < 1e-5
    assert np.all(np.asarray(out1[b, lengths[b]:]) == 0)  # padding outputs zeros
    assert rel_err(out2[b], whole[b][lengths[b]:]) < 1e-5


def test_gradients_match_central_differences_of_the_float64_form():
  """d<out, cot>/d(q, k, v) in a random direction: JAX's gradient through the chunkwise form
  (T not a multiple of the chunk, packed rows, decay) vs float64 central differences."""
  spec, n, k = LinearSpec(chunk_size=4, decay=(0.9, 0.7)), 4, 2
  q, key, v = _qkv(n, k, seed=3)
  rng = np.random.default_rng(11)
  cot = rng.normal(size=(B, T, n, H))
  directions = [rng.normal(size=x.shape) for x in (q, key, v)]

  def loss(q, key, v):
    out = linear_attention(q, key, v, spec=spec, scale=SCALE, segment_ids=SEGMENTS)[0]
    return jnp.sum(out * cot)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, key, v)
  predicted = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, directions))

  def loss_np(step):
    moved = [np.asarray(x, np.float64) + step * d for x, d in zip((q, key, v), directions)]
    return np.sum(_reference(spec, *moved, SEGMENTS) * cot)

  eps = 1e-4
  measured = (loss_np(eps) - loss_np(-eps)) / (2 * eps)
  assert abs(predicted - measured) < 1e-4 * max(1.0, abs(measured)), (predicted, measured)


def test_invisible_values_never_reach_visible_outputs_or_gradients():
  """NaN / inf in padding tokens (segment 0) and in the chunk padding: outputs equal the clean
  run's, gradients are finite and equal too."""
  spec, n, k = LinearSpec(chunk_size=4, feature_map="identity", decay=0.9, normalize=False), 4, 2
  q, key, v = _qkv(n, k, seed=4)
  pad = (SEGMENTS == 0)[..., None, None]
  poisoned = [np.where(pad, np.nan if i % 2 else np.inf, x) for i, x in enumerate((q, key, v))]

  @jax.jit
  def values_and_grads(q, key, v):
    f = lambda q, k, v: linear_attention(q, k, v, spec=spec, scale=SCALE,
                                         segment_ids=SEGMENTS)[0]
    out, vjp = jax.vjp(f, q, key, v)
    return out, vjp(jnp.ones_like(out))

  clean_out, clean_grads = values_and_grads(q, key, v)
  out, grads = values_and_grads(*poisoned)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(clean_out))
  for got, want in zip(grads, clean_grads):
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_spec_rejects_misuse():
  with pytest.raises(ValueError, match="linear_feature_map"):
    LinearSpec(feature_map="softmax")
  with pytest.raises(ValueError, match="linear_decay"):
    LinearSpec(decay=1.5)
  with pytest.raises(ValueError, match="linear_normalize"):
    LinearSpec(feature_map="identity", normalize=True)
  with pytest.raises(ValueError, match="linear_attention_chunk_size"):
    LinearSpec(chunk_size=0)
  with pytest.raises(ValueError, match="one gamma per kv head"):
    LinearSpec(decay=(0.9, 0.8, 0.7)).check_heads(2)


def test_a_callable_feature_map():
  """LinearSpec(feature_map=fn) on the keyword path: a squared ReLU (positive, so with the
  normalizer) equals the float64 form with the same map; a map that changes the shape is
  refused naming it."""
  spec = LinearSpec(chunk_size=4, feature_map=lambda x: jnp.square(jax.nn.relu(x)) + 1e-3)
  q, key, v = _qkv(4, 2, seed=7)
  got = jax.jit(lambda q, k, v: linear_attention(q, k, v, spec=spec, scale=SCALE,
                                                 segment_ids=SEGMENTS)[0])(q, key, v)
  want = linear_attention_np(q, k=key, v=v, feature_map=lambda x: np.maximum(x, 0) ** 2 + 1e-3,
                             decay=(), normalize=True, scale=SCALE, segment_ids=SEGMENTS)
  assert rel_err(got, want) < 1e-5
  bad = LinearSpec(feature_map=lambda x: x[..., :2])
  with pytest.raises(ValueError, match="must keep the shape"):
    linear_attention(jnp.asarray(q), jnp.asarray(key), jnp.asarray(v), spec=bad, scale=SCALE)
