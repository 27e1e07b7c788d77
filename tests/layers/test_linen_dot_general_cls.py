"""The Linen drop-in's dot_general classes against flax.linen's own layer: a Linen op class
(fp8_ops) gets one op per projection with Flax's variable paths, outputs and gradients
(fp8 training reads its new scales from the gradients); a plain class wins over the
function, as in Flax's DenseGeneral."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.linen import fp8_ops

from meshattn.layers import linen as mlinen

TOL = dict(rtol=1e-5, atol=1e-5)
OPS = [fp8_ops.Fp8DotGeneralOp, fp8_ops.Fp8DirectDotGeneralOp]


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, str(a.dtype)), tree)


def _pair(**kw):
  return nn.MultiHeadDotProductAttention(**kw), mlinen.MultiHeadDotProductAttention(**kw)


@pytest.mark.filterwarnings("ignore:The Fp8DotGeneralOp is deprecated")
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_fp8_ops_like_flax(op):
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  flax_layer, ours = _pair(num_heads=2, qkv_features=16, qkv_dot_general_cls=op,
                           out_dot_general_cls=op)
  theirs = flax_layer.init(jax.random.key(0), x)
  mine = ours.init(jax.random.key(0), x)
  assert _shapes(mine) == _shapes(theirs)  # query/key/value/out each own {op}_0
  # The op's initial scales and histories are Flax's (Linen parameters are drawn otherwise:
  # docs/migration.md).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               mine["_overwrite_with_gradient"], theirs["_overwrite_with_gradient"])

  # A trained-looking state: scales and histories away from their init values.
  leaves, treedef = jax.tree.flatten(theirs)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = jax.tree.unflatten(treedef, [
      leaf + 0.1 * jnp.abs(jax.random.normal(k, leaf.shape)) for k, leaf in zip(keys, leaves)])
  np.testing.assert_allclose(ours.apply(variables, x), flax_layer.apply(variables, x), **TOL)

  def loss(layer):
    return lambda v: jnp.sum(jnp.sin(layer.apply(v, x)))

  grads_flax = jax.jit(jax.grad(loss(flax_layer)))(variables)
  grads_ours = jax.jit(jax.grad(loss(ours)))(variables)
  assert _shapes(grads_ours) == _shapes(grads_flax)
  # `_overwrite_with_gradient`: fp8's next scales and amax histories, computed in the
  # backward pass; the parameters' gradients, through the quantized dots.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads_ours, grads_flax)


def test_plain_class_wins_over_function_like_flax():
  calls = []

  class Doubled:  # a stateless class: Flax's DenseGeneral calls Doubled() and uses it
    def __call__(self, *args, **kwargs):
      calls.append(1)
      return 2.0 * jax.lax.dot_general(*args, **kwargs)

  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  kw = dict(num_heads=2, qkv_dot_general=jax.lax.dot_general, qkv_dot_general_cls=Doubled)
  flax_layer, ours = _pair(**kw)
  variables = flax_layer.init(jax.random.key(0), x)
  want = flax_layer.apply(variables, x)
  calls.clear()  # Flax's own calls above
  got = ours.apply(variables, x)
  assert len(calls) == 3  # ours called the class: query, key, value (out has its own)
  np.testing.assert_allclose(got, want, **TOL)
  plain = nn.MultiHeadDotProductAttention(num_heads=2).apply(variables, x)
  assert not np.allclose(got, plain, **TOL)  # the class ran


def test_fp8_op_on_a_mesh():
  """With a mesh in `settings`: the parameters come boxed by logical axes, the ops' variables
  raw (Flax's fp8 variables carry no partitioning), and the result is Flax's."""
  from flax.core import FrozenDict

  from helpers.meshes import mesh_of
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  op = fp8_ops.Fp8DirectDotGeneralOp
  x = jax.random.normal(jax.random.key(1), (4, 6, 16))
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=4, qkv_dot_general_cls=op)
  ours = mlinen.MultiHeadDotProductAttention(num_heads=4, qkv_dot_general_cls=op,
                                             settings=FrozenDict(mesh=mesh))
  variables = jax.jit(flax_layer.init)(jax.random.key(0), x)
  mine = jax.jit(ours.init)(jax.random.key(0), x)
  assert isinstance(mine["params"]["query"]["kernel"], nn.LogicallyPartitioned)
  assert _shapes(nn.unbox(mine)) == _shapes(variables)
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x),
                             jax.jit(flax_layer.apply)(variables, x), **TOL)
