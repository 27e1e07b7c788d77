"""Regressions from review: calls the cache cannot serve are refused before
any state changes, and inputs that cannot be honoured are never ignored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.layers import Attention, MaskSpec
from meshattn.sharding import shard_module

from helpers.meshes import mesh_of


def build(mesh=None, **kw):
  base = dict(emb_dim=32, num_query_heads=4, num_kv_heads=2, head_dim=16)
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), **{**base, **kw})


def snapshot(cache):
  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(cache))]


def assert_unchanged(before, cache):
  for a, b in zip(before, snapshot(cache)):
    np.testing.assert_array_equal(a, b)


def test_fused_qkv_refuses_a_separate_inputs_kv_under_jit():
  model = build(fused_qkv=True)
  x, other = jnp.ones((2, 5, 32)), jnp.zeros((2, 5, 32))

  @nnx.jit
  def call(model, q, kv):
    return model(q, kv)

  with pytest.raises(ValueError, match="fused_qkv projects self-attention only"):
    call(model, x, other)
  assert model(x).shape == (2, 5, 32)  # self-attention is fine


def test_chunked_prefill_overflow_changes_nothing():
  model = build(use_chunked_prefill=True, prefill_chunk_size=4)
  cache = model.init_cache(1, 6)
  before = snapshot(cache)
  with pytest.raises(ValueError, match="max_length=6"):
    model(jnp.ones((1, 8, 32)), model_mode="prefill")
  assert_unchanged(before, cache)


def test_duplicate_slots_are_refused():
  model = build()
  cache = model.init_cache(4, 8)
  before = snapshot(cache)
  with pytest.raises(ValueError, match="at most once"):
    model(jnp.ones((2, 3, 32)), model_mode="prefill", slots=jnp.array([1, 1]))
  assert_unchanged(before, cache)


def test_bidirectional_layers_only_prefill_whole_prompts():
  model = build(mask=MaskSpec("full"))
  model.init_cache(1, 8)
  x = jax.random.normal(jax.random.key(0), (1, 5, 32))
  np.testing.assert_allclose(model(x, model_mode="prefill"), model(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="bidirectional"):
    model(x[:, :1], model_mode="autoregressive")
  with pytest.raises(ValueError, match="empty slot"):
    model(x[:, :2], model_mode="prefill")
  chunked = build(mask=MaskSpec("full"), use_chunked_prefill=True)
  chunked.init_cache(1, 8)
  with pytest.raises(ValueError, match="bidirectional"):
    chunked(x, model_mode="prefill")


def test_a_step_failing_part_way_restores_the_cache(monkeypatch):
  """If anything raises after the cache was written (eagerly), the cache is put back."""
  from meshattn.layers.kernels import dispatch
  model = build(decode_attention="ragged")
  cache = model.init_cache(2, 8)
  model(jnp.ones((2, 3, 32)), model_mode="prefill")
  before = snapshot(cache)

  def failing_kernel(*args, **kwargs):
    raise RuntimeError("kernel failed")

  monkeypatch.setattr(dispatch, "load", lambda settings, kernel: failing_kernel)
  with pytest.raises(RuntimeError, match="kernel failed"):
    model(jnp.ones((2, 1, 32)), model_mode="autoregressive")
  assert_unchanged(before, cache)


def test_sharded_ragged_decode_with_kv_heads_not_dividing_tensor():
  mesh = mesh_of(data=2, tensor=4)
  kw = dict(num_query_heads=8, num_kv_heads=2, decode_attention="ragged")
  x = jax.random.normal(jax.random.key(1), (2, 7, 32))

  @nnx.jit(static_argnames="mode")
  def step(model, x, mode):  # jitted: eager dispatch over 8 devices is slow
    return model(x, model_mode=mode)

  def serve(model):
    model.init_cache(2, 8)
    outs = [step(model, x[:, :5], "prefill"), step(model, x[:, 5:6], "autoregressive")]
    outs.append(model(x[:, 6:7], model_mode="autoregressive"))  # and one eager step
    return jnp.concatenate(outs, axis=1)

  want = serve(build(**kw))
  sharded = build(mesh, **kw)
  shard_module(sharded, mesh, sharded.settings.logical_axis_rules)
  np.testing.assert_allclose(serve(sharded), want, rtol=1e-5, atol=1e-5)
