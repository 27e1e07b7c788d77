"""Property tests on random small shapes: causality, window and chunk locality,
segment isolation, and no NaN for fully masked rows.

Each property perturbs the inputs that a query must not see and checks that
its output does not move (bit-for-bit), while a control perturbation of a
visible token does move it, so the test cannot pass on a layer that ignores
its inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings, strategies as st

from meshattn.layers import Attention, MaskSpec

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
EMB = 16


@functools.lru_cache(maxsize=None)
def layer(attention_type: str, window: int | None, chunk: int | None, kv_heads: int, sinks: bool):
  mask = MaskSpec(attention_type, window=window, chunk=chunk)
  model = Attention(rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=4, num_kv_heads=kv_heads,
                    head_dim=4, mask=mask, attention_sink=sinks, attn_logits_soft_cap=20.0)
  graph, state = nnx.split(model)

  @jax.jit
  def run(x, seg):
    return nnx.merge(graph, state)(x, decoder_segment_ids=seg)

  return run


def random_inputs(seed, length):
  return jax.random.normal(jax.random.key(seed), (1, length, EMB))  # [1, T, D]


def perturb(x, index, seed):
  return x.at[:, index].add(jax.random.normal(jax.random.key(seed + 1000), (x.shape[0], EMB)))


def keys_seen_by_last(run, length, seed):
  """The key positions s whose perturbation moves the last query's output (bit-for-bit) in
  one unpacked row of `length` tokens."""
  seg = jnp.ones((1, length), jnp.int32)
  x = random_inputs(seed, length)
  base = run(x, seg)[:, -1]
  return {s for s in range(length)
          if not np.array_equal(run(perturb(x, s, seed), seg)[:, -1], base)}


@SETTINGS
@given(length=st.integers(2, 12), t=st.integers(0, 11), seed=st.integers(0, 10**6),
       kv_heads=st.sampled_from([4, 2, 1]), kind=st.sampled_from(["global", "local_sliding", "chunk"]))
def test_future_tokens_never_change_past_outputs(length, t, seed, kv_heads, kind):
  t = t % (length - 1)  # a query with at least one future token
  run = layer(kind, 3 if kind == "local_sliding" else None, 4 if kind == "chunk" else None,
              kv_heads, True)
  seg = jnp.ones((1, length), jnp.int32)
  x = random_inputs(seed, length)
  base = run(x, seg)
  moved = run(perturb(x, slice(t + 1, None), seed), seg)
  np.testing.assert_array_equal(base[:, : t + 1], moved[:, : t + 1])
  # Control: the token itself is visible to its own query.
  assert not np.allclose(run(perturb(x, t, seed), seg)[:, t], base[:, t])


@SETTINGS
@given(length=st.integers(4, 12), window=st.integers(1, 4), seed=st.integers(0, 10**6),
       kv_heads=st.sampled_from([4, 1]))
def test_sliding_window_sees_exactly_window_keys(length, window, seed, kv_heads):
  t = length - 1
  seen = keys_seen_by_last(layer("local_sliding", window, None, kv_heads, False), length, seed)
  assert seen == {s for s in range(length) if t - window < s <= t}, (t, window)


@SETTINGS
@given(length=st.integers(4, 12), chunk=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_chunk_attention_stays_in_its_chunk(length, chunk, seed):
  t = length - 1
  seen = keys_seen_by_last(layer("chunk", None, chunk, 2, False), length, seed)
  assert seen == {s for s in range(length) if s // chunk == t // chunk and s <= t}, (t, chunk)


@SETTINGS
@given(lengths=st.lists(st.integers(1, 4), min_size=2, max_size=3), pad=st.integers(0, 3),
       seed=st.integers(0, 10**6), kind=st.sampled_from(["global", "full"]))
def test_segments_are_isolated_and_padding_is_zero(lengths, pad, seed, kind):
  ids = [i + 1 for i, n in enumerate(lengths) for _ in range(n)] + [0] * pad
  seg = jnp.array([ids], jnp.int32)
  length = len(ids)
  run = layer(kind, None, None, 2, True)
  x = random_inputs(seed, length)
  base = run(x, seg)
  assert np.isfinite(np.asarray(base)).all()
  # Padding rows attend nowhere: their context is zero, so the output is zero (no bias).
  np.testing.assert_array_equal(base[0, seg[0] == 0], 0.0)
  # Changing every token of segment 1 leaves the other segments untouched.
  in_first = np.asarray(seg[0] == 1)
  moved = run(perturb(x, np.nonzero(in_first)[0], seed), seg)
  np.testing.assert_array_equal(base[0, ~in_first], moved[0, ~in_first])
  assert not np.allclose(base[0, in_first], moved[0, in_first])


def test_fully_masked_rows_have_finite_gradients():
  run_model = Attention(rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=2, head_dim=8)
  x = random_inputs(0, 6)
  seg = jnp.array([[1, 1, 0, 0, 2, 2]])
  mask = jnp.zeros((1, 1, 6, 6), bool)  # the user masks everything

  def loss(x):
    return jnp.sum(run_model(x, decoder_segment_ids=seg, mask=mask) ** 2)

  grad = jax.grad(loss)(x)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(run_model(x, decoder_segment_ids=seg, mask=mask), 0.0)
