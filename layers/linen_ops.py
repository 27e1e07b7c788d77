"""Flax Linen dot_general classes (`qkv_dot_general_cls` / `out_dot_general_cls`, e.g.
`flax.linen.fp8_ops.Fp8DotGeneralOp`) as stateful NNX modules inside meshattn's projections.

Flax's Linen `DenseGeneral` instantiates such a class inside each projection, so its
variables sit at `<collection>/query/Fp8DotGeneralOp_0/...` (fp8: the scales and amax
histories in `_overwrite_with_gradient`), one op per projection. The Linen drop-in builds an
NNX layer, so it keeps each op's variables as NNX Variables of the same collection, under
the same attribute name in the same projection, and applies the Linen op functionally on
them: the bridge then writes Flax's variable tree, and gradients reach the op's variables
(fp8 training reads the new scales from them) as they do in Flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import unfreeze
from flax.nnx import variablelib

from meshattn.layers.projections import DenseGeneral


def is_linen_module_class(cls) -> bool:
  return isinstance(cls, type) and issubclass(cls, nn.Module)


class _Subtree(nnx.Module):
  """A nested group of an op's variables (Linen submodules of the op)."""


def _store(holder: nnx.Module, collection: str, tree: dict) -> None:
  """holder.<name> = a Variable of `collection` per leaf of tree (nested dicts -> _Subtree)."""
  variable_type = variablelib.variable_type_from_name(collection, allow_register=True)
  for name, value in tree.items():
    if isinstance(value, dict):
      child = getattr(holder, name, None) or _Subtree()
      _store(child, collection, value)
      setattr(holder, name, child)
    elif isinstance(existing := getattr(holder, name, None), nnx.Variable):
      existing[...] = value  # in place: the Variable (and its metadata) stays the same
    else:
      setattr(holder, name, variable_type(value))


def _read(holder: nnx.Module, tree: dict) -> dict:
  """The values at tree's paths (tree gives the structure: the op's variables at init)."""
  return {name: _read(getattr(holder, name), value) if isinstance(value, dict)
          else getattr(holder, name)[...] for name, value in tree.items()}


class LinenDotGeneral(nnx.Module):
  """One Linen dot_general op (`op_class()` in Flax's DenseGeneral) with its variables.

  Called with jax.lax.dot_general's signature; runs `op_class(parent=None).apply` on the
  stored variables and keeps whatever the op updates (fp8's forward updates nothing: its
  new scales arrive as gradients, Flax's `_overwrite_with_gradient` convention).
  """

  def __init__(self, op_class, lhs, rhs, dimension_numbers, *, precision, key):
    self.op_class = op_class
    variables = unfreeze(op_class(parent=None).init(key, lhs, rhs, dimension_numbers,
                                                    precision=precision))
    # Structure only (static): which collection holds which names.
    self.layout = jax.tree.map(lambda _: None, variables)
    for collection, tree in variables.items():
      _store(self, collection, tree)

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    variables = {collection: _read(self, tree) for collection, tree in self.layout.items()}
    keywords = dict(precision=precision)
    if preferred_element_type is not None:
      keywords["preferred_element_type"] = preferred_element_type
    # The op's own state may change in its forward; its params never do (Flax's rule).
    mutable = [collection for collection in self.layout if collection != "params"]
    op = self.op_class(parent=None)
    if not mutable:
      return op.apply(variables, lhs, rhs, dimension_numbers, **keywords)
    out, updated = op.apply(variables, lhs, rhs, dimension_numbers, mutable=mutable, **keywords)
    for collection, tree in unfreeze(updated).items():
      _store(self, collection, tree)
    return out


def attach_linen_dot_generals(layer: nnx.Module, qkv_class, out_class, key) -> None:
  """Give each projection of `layer` its own op, named as Flax names it ({class}_0).

  Each op is initialized on a one-token input [1, *in] (the layer is built before any
  input is seen); Flax initializes it on the first call's input. The fp8 ops' variables
  (scales, amax histories) do not depend on the input's shape, so they are the same; an op
  whose variables did would get those of the one-token input."""
  names = [(name, qkv_class) for name in ("query", "key", "value", "qkv_proj", "gate")]
  names.append(("out", out_class))
  for name, op_class in names:
    projection = getattr(layer, name, None)
    if op_class is None or not isinstance(projection, DenseGeneral):
      continue
    dtype = projection.dtype or projection.kernel[...].dtype
    n_in = len(projection.in_shape)
    lhs = jnp.zeros((1, *projection.in_shape), dtype)  # [1, *in]
    rhs = jnp.zeros(projection.in_shape + projection.out_shape, dtype)  # [*in, *out]
    dims = ((tuple(range(1, 1 + n_in)), tuple(range(n_in))), ((), ()))
    key, op_key = jax.random.split(key)
    op = LinenDotGeneral(op_class, lhs, rhs, dims, precision=projection.precision, key=op_key)
    projection.use_dot_general_module(f"{op_class.__name__}_0", op)
