"""Device mesh construction and logical-axis sharding for meshattn.

Meshes use `AxisType.Auto` for every axis and activations are placed with
`jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))`; see
`mesh.py` and `logical.py` for why. Several processes (hosts): `multihost.py`.
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
from .mesh import create_mesh, device_groups, mesh_shape_string
from .multihost import (
  distributed_env,
  host_copy,
  process0_value,
  initialize_from_env,
  make_global_array,
  process_local_data,
  process_part,
)

__all__ = [
  "LOGICAL_AXES_KEY",
  "constrain",
  "create_mesh",
  "create_sharded",
  "device_groups",
  "distributed_env",
  "get_param_shardings",
  "get_param_specs",
  "host_copy",
  "process0_value",
  "initialize_from_env",
  "logical_to_sharding",
  "logical_to_spec",
  "make_global_array",
  "mesh_shape_string",
  "process_local_data",
  "process_part",
  "shard_module",
]
