"""Linen drop-ins with a mesh shard like the NNX layer (issue 19).

`meshattn.layers.linen.MultiHeadDotProductAttention(settings=FrozenDict(mesh=mesh))` boxes
each parameter as Linen's `nn.LogicallyPartitioned` with the layer's logical axis names, so a
Linen user's own tools (`nn.get_partition_spec`, `nn.logical_to_mesh_sharding`, `nn.unbox`)
place it exactly as meshattn places the NNX layer's, and the unboxed tree is Flax's.
"""

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

from meshattn.layers import MultiHeadAttention
from meshattn.layers import linen as mlinen
from meshattn.sharding import get_param_shardings

from helpers.meshes import mesh_of


def test_linen_params_are_placed_by_the_logical_rules():
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  x = jax.random.normal(jax.random.key(1), (4, 6, 16))  # [B, T, D]
  ours = mlinen.MultiHeadDotProductAttention(num_heads=4, settings=FrozenDict(mesh=mesh))
  boxed = jax.eval_shape(ours.init, jax.random.key(0), x)
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in jax.tree.leaves(
      boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned)))

  nnx_layer = MultiHeadAttention(num_heads=4, in_features=16, mesh=mesh, rngs=nnx.Rngs(0))
  rules = nnx_layer.settings.logical_axis_rules
  want = nnx.to_pure_dict(get_param_shardings(nnx_layer, mesh, rules))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
  assert jax.tree.map(lambda s: s.spec, shardings) == jax.tree.map(lambda s: s.spec, want)

  # Born sharded through Linen's own tools; the unboxed tree runs in Flax's module unchanged.
  variables = jax.jit(ours.init, out_shardings={"params": shardings})(jax.random.key(0), x)
  kernel = nn.unbox(variables)["params"]["query"]["kernel"]  # [D, N, H]
  assert kernel.sharding.is_equivalent_to(shardings["query"]["kernel"], 3)
  flax_module = nn.MultiHeadDotProductAttention(num_heads=4)
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x),
                             jax.jit(flax_module.apply)(nn.unbox(variables), x),
                             rtol=1e-5, atol=1e-6)
