"""Inputs the layer cannot honour raise ValueError naming the argument and what is allowed,
before anything changes (issue 14, part 4): in eager mode and under jit, as the shape and
dtype checks run while tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.layers import Attention


def build(**kw):
  return Attention(emb_dim=32, num_query_heads=4, num_kv_heads=2, head_dim=8,
                   max_prefill_predict_length=6, rngs=nnx.Rngs(0), **kw)


def snapshot(cache):
  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(cache))]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("seg_len", [1, 6])
def test_prefill_segment_ids_must_match_the_tokens(use_jit, seg_len):
  model = build()
  cache = model.init_cache(2, 16)
  before = snapshot(cache)
  call = lambda m, x, seg: m(x, decoder_segment_ids=seg, model_mode="prefill")
  call = nnx.jit(call) if use_jit else call
  with pytest.raises(ValueError, match=r"decoder_segment_ids has shape \(2, %d\).*\(2, 4\)" % seg_len):
    call(model, jnp.ones((2, 4, 32)), jnp.ones((2, seg_len), jnp.int32))
  for a, b in zip(before, snapshot(cache)):
    np.testing.assert_array_equal(a, b)


def test_float_slots_are_refused():
  model = build()
  model.init_cache(4, 16)
  with pytest.raises(ValueError, match="slots must be integer"):
    model(jnp.ones((1, 2, 32)), model_mode="prefill", slots=jnp.array([1.9]))


@pytest.mark.parametrize("mode", ["train", "prefill"])
def test_integer_activations_are_refused(mode):
  model = build()
  model.init_cache(2, 16)
  with pytest.raises(ValueError, match="inputs_q must be floating-point"):
    model(jnp.ones((2, 3, 32), jnp.int32), model_mode=mode)


def test_prefill_longer_than_max_prefill_predict_length():
  model = build()
  model.init_cache(2, 16)
  with pytest.raises(ValueError, match="max_prefill_predict_length=6"):
    model(jnp.ones((2, 7, 32)), model_mode="prefill")


def test_train_segment_ids_of_the_wrong_length_say_so():
  model = build()
  with pytest.raises(ValueError, match=r"decoder_segment_ids has shape \(2, 5\).*query length 4"):
    model(jnp.ones((2, 4, 32)), decoder_segment_ids=jnp.ones((2, 5), jnp.int32))


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("argument, value, match", [
    ("inputs_positions", np.zeros((2, 3), np.int32),
     r"inputs_positions has its last axis of length 3: it must be the query length 4"),
    ("inputs_positions", np.zeros((3, 4), np.int32),
     r"inputs_positions has shape \(3, 4\): its batch dims \(3,\) must broadcast to .* \(2,\)"),
    ("inputs_kv_positions", np.zeros((2, 5), np.int32),
     r"inputs_kv_positions has its last axis of length 5: it must be the key length 4"),
    ("mask", np.ones((2, 4, 4, 5), bool),
     r"mask has shape \(2, 4, 4, 5\): it must broadcast to .* = \[2, heads, 4, 4\]"),
    ("bias", np.zeros((3, 1, 4, 4), np.float32),
     r"bias has shape \(3, 1, 4, 4\): it must broadcast to .* = \[2, heads, 4, 4\]"),
], ids=["positions-length", "positions-batch", "kv-positions-length", "mask", "bias"])
def test_train_inputs_of_the_wrong_shape_name_the_argument(use_jit, argument, value, match):
  model = build()
  call = lambda m, x, v: m(x, **{argument: v})
  call = nnx.jit(call) if use_jit else call
  with pytest.raises(ValueError, match=match):
    call(model, jnp.ones((2, 4, 32)), jnp.asarray(value))


def test_an_empty_prefill_is_refused():
  model = build()
  cache = model.init_cache(2, 16)
  before = snapshot(cache)
  with pytest.raises(ValueError, match=r"model_mode='prefill' needs at least one token per row"):
    model(jnp.ones((2, 0, 32)), model_mode="prefill")
  for a, b in zip(before, snapshot(cache)):
    np.testing.assert_array_equal(a, b)
