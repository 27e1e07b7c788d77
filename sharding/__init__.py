"""Device mesh construction and logical-axis sharding for meshattn.

Meshes use `AxisType.Auto` for every axis and activations are placed with
`jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))`; see
`mesh.py` and `logical.py` for why.
"""

from .logical import (
  LOGICAL_AXES_KEY,
  constrain,
  create_sharded,
  get_param_shardings,
  get_param_specs,
  logical_to_sharding,
  logical_to_spec,
  shard_module,
)
from .mesh import create_mesh, mesh_shape_string

__all__ = [
  "LOGICAL_AXES_KEY",
  "constrain",
  "create_mesh",
  "create_sharded",
  "get_param_shardings",
  "get_param_specs",
  "logical_to_sharding",
  "logical_to_spec",
  "mesh_shape_string",
  "shard_module",
]
