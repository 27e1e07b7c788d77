"""The layer tests' meshes: MaxText's five axes over the fake CPU devices."""

from __future__ import annotations

import jax
import pytest

from meshattn.sharding import create_mesh

AXES = ("data", "fsdp", "context", "tensor", "autoregressive")


def mesh_of(data: int = 1, fsdp: int = 1, context: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
  """A mesh with these ici degrees (autoregressive 1) over data * fsdp * context * tensor
  devices; the test is skipped where there are fewer."""
  needed = data * fsdp * context * tensor
  if len(jax.devices()) < needed:
    pytest.skip(f"needs {needed} devices")
  return create_mesh({"mesh_axes": AXES, "ici_data_parallelism": data,
                      "ici_fsdp_parallelism": fsdp, "ici_context_parallelism": context,
                      "ici_tensor_parallelism": tensor, "ici_autoregressive_parallelism": 1})
