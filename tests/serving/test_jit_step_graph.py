"""jit_step splits a module once; a Variable or submodule assigned afterwards is seen.

meshattn's modules move the graph epoch when an attribute (or an item of Decoder.blocks)
is assigned (kvcache/graph_epoch.py), and the bound step splits again, keeping its
compiled function when the graph is the same; values changed in place need nothing; a
foreign module's assignment is seen after `structure_changed()`.
Each check compares the step with the eager call on the same module.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.kvcache import graph_epoch
from meshattn.layers import Attention, Decoder
from meshattn.layers.flax_compat import MultiHeadAttention
from meshattn.layers.serving import jit_step, structure_changed


def _prefill(module, x):
  return module(x, model_mode="prefill")


def _layer() -> Attention:
  layer = Attention(load_config("tiny"), rngs=nnx.Rngs(0))
  layer.init_cache(2, 16)
  return layer


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 3, 64)), jnp.float32)  # [B, T, D]


def _step_and_eager(step, layer, x):
  layer.cache.reset([0, 1])
  got = np.asarray(step(layer, x))
  layer.cache.reset([0, 1])
  want = np.asarray(layer(x, model_mode="prefill"))
  return got, want


@pytest.mark.parametrize("change", ["parameter", "submodule", "in_place"])
def test_a_step_sees_what_was_assigned_after_it_bound(change):
  layer, x = _layer(), _x()
  step = jit_step(_prefill)
  before = np.asarray(step(layer, x))
  kernel = layer.key.kernel[...]  # [D, K, H]
  if change == "parameter":
    layer.key.kernel = nnx.Param(kernel * 0.5)
  elif change == "submodule":
    layer.key = Attention(load_config("tiny"), rngs=nnx.Rngs(7)).key  # other weights
  else:
    layer.key.kernel[...] = kernel * 0.5
  got, want = _step_and_eager(step, layer, x)
  assert not np.allclose(want, before)  # the change matters ...
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # ... and the step sees it


def test_steps_resets_and_calls_do_not_move_the_epoch():
  """Otherwise every call would split the module again (the cost jit_step avoids)."""
  layer, x = _layer(), _x()
  step = jit_step(_prefill)
  step(layer, x)
  epoch = graph_epoch.epoch()
  _step_and_eager(step, layer, x)
  nnx.jit(_prefill)(layer, x)
  assert graph_epoch.epoch() == epoch


class _Wrapped(nnx.Module):
  """A user's module around the layer: flax's own modules report nothing."""

  def __init__(self):
    self.attention = _layer()
    self.head = nnx.Linear(64, 64, rngs=nnx.Rngs(1))

  def __call__(self, x, model_mode):
    return self.head(self.attention(x, model_mode=model_mode))


def test_a_foreign_assignment_is_seen_after_structure_changed():
  model, x = _Wrapped(), _x()
  step = jit_step(_prefill)
  step(model, x)
  model.head.kernel = nnx.Param(model.head.kernel[...] * 0.5)
  structure_changed()
  model.attention.cache.reset([0, 1])
  got = np.asarray(step(model, x))
  model.attention.cache.reset([0, 1])
  want = np.asarray(model(x, model_mode="prefill"))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_change_elsewhere_costs_a_split_not_a_retrace():
  """The epoch is global: building another module moves it. The bound step splits again,
  finds the same graph and keeps its compiled function."""
  layer, x = _layer(), _x()
  traces = []

  def prefill(module, x):
    traces.append(1)  # runs once per trace
    return module(x, model_mode="prefill")

  step = jit_step(prefill)
  step(layer, x)
  epoch = graph_epoch.epoch()
  _layer()  # an unrelated layer and its cache
  assert graph_epoch.epoch() != epoch
  layer.cache.reset([0, 1])
  step(layer, x)
  assert len(traces) == 1


def test_a_swapped_decoder_block_is_seen():
  model = Decoder(load_config("tiny-lm"), rngs=nnx.Rngs(0))
  other = Decoder(load_config("tiny-lm"), rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 5)), jnp.int32)  # [B, T]
  step = jit_step(lambda m, t: m(t))
  before = np.asarray(step(model, tokens))
  model.blocks[1] = other.blocks[1]  # an item of the blocks list, not an attribute
  got, want = np.asarray(step(model, tokens)), np.asarray(model(tokens))
  assert not np.allclose(want, before)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_eval_after_binding_is_seen():
  """Flags such as `deterministic` are static values of the compiled graph."""
  mha = MultiHeadAttention(num_heads=4, in_features=16, dropout_rate=0.5, deterministic=False,
                           decode=False, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 16)), jnp.float32)  # [B, T, D]
  step = jit_step(lambda m, x: m(x))
  step(mha, x)  # bound with dropout on
  mha.eval()
  np.testing.assert_allclose(np.asarray(step(mha, x)), np.asarray(mha(x)), rtol=1e-6, atol=1e-6)


def test_a_step_that_sows_leaves_the_parameters_alone():
  """A Variable the step adds (a sown intermediate) is not returned and shifts nothing."""
  layer, x = _layer(), _x()
  params = nnx.state(layer, nnx.Param)
  before = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(params)}
  jit_step(lambda m, x: m(x, sow_weights=True))(layer, x)
  after = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(before[path], after[path])


def test_a_deleted_cache_is_not_served_from_the_bound_step():
  """Deleting an attribute moves the epoch like assigning one: the step splits again and
  fails as the eager call does, instead of running on the deleted cache's arrays."""
  layer, x = _layer(), _x()
  step = jit_step(_prefill)
  step(layer, x)
  epoch = graph_epoch.epoch()
  del layer.cache
  assert graph_epoch.epoch() != epoch
  with pytest.raises(Exception) as eager:
    layer(x, model_mode="prefill")
  with pytest.raises(type(eager.value)):
    step(layer, x)
