"""Build the device mesh from the config's `ici_*` / `dcn_*` parallelism keys.

Sharding mode: every mesh axis is `jax.sharding.AxisType.Auto`. jax 0.10's
`jax.make_mesh` defaults to Explicit axes, which would make sharding part of
every array's type and force explicit `out_sharding`s through the layer; with
Auto axes the layer only hints placements with
`jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))` and leaves
the rest to the compiler. We therefore build `jax.sharding.Mesh` ourselves and
pass `axis_types` explicitly.

Layout: mesh axis `a` has size `dcn_a * ici_a`. The dcn part is outermost, so
the devices of one slice (one ICI domain, or one host on GPU/CPU) sit in a
contiguous block of the inner ici part of every axis, and only the outer dcn
part crosses the slow inter-slice network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

__all__ = ["create_mesh", "mesh_shape_string"]


def _get(config: Any, key: str, default: Any) -> Any:
  """Read `key` from an attribute-style config or a plain Mapping."""
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default)


def _mesh_axes(config: Any) -> tuple[str, ...]:
  axes = _get(config, "mesh_axes", None)
  if axes is None:
    raise ValueError("config has no `mesh_axes`; cannot build a mesh")
  if isinstance(axes, str):
    axes = (axes,)
  axes = tuple(str(a) for a in axes)
  if not axes:
    raise ValueError("`mesh_axes` is empty; a mesh needs at least one axis")
  if len(set(axes)) != len(axes):
    raise ValueError(f"`mesh_axes` has duplicate names: {axes}")
  return axes


def _read_parallelism(config: Any, prefix: str, axes: Sequence[str]) -> dict[str, int]:
  """Map each config key `{prefix}_{axis}_parallelism` to its int value (default 1)."""
  sizes = {}
  for axis in axes:
    key = f"{prefix}_{axis}_parallelism"
    value = _get(config, key, 1)
    try:
      value = int(value)
    except (TypeError, ValueError):
      raise ValueError(f"{key} must be an int, got {value!r}") from None
    if value == 0 or value < -1:
      raise ValueError(f"{key} must be a positive int or -1 (fill), got {value}")
    sizes[key] = value
  return sizes


def _fill(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
  """Replace at most one -1 so that the sizes multiply to `total`; check the product.

  `what` describes `total` in error messages (e.g. "8 devices per slice").
  """
  fill_keys = [k for k, v in sizes.items() if v == -1]
  if len(fill_keys) > 1:
    raise ValueError(f"only one of these may be -1, got -1 for {', '.join(fill_keys)}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  described = " * ".join(f"{k}={v}" for k, v in sizes.items())
  if fill_keys:
    key = fill_keys[0]
    if total % fixed:
      raise ValueError(
        f"{key}=-1 cannot be filled: {what} is not divisible by the "
        f"product {fixed} of the other sizes ({described})"
      )
    return {**sizes, key: total // fixed}
  if fixed != total:
    raise ValueError(f"{described} = {fixed}, but the mesh needs {what}")
  return dict(sizes)


def _detected_slices(devices: Sequence[Any]) -> int:
  """How many slices the hardware has: TPU slice_index, else processes (hosts)."""
  if all(hasattr(d, "slice_index") for d in devices):
    return len({d.slice_index for d in devices})
  return len({getattr(d, "process_index", 0) for d in devices})


def _slice_mesh(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Arrange one slice's devices; a plain reshape where mesh_utils can't (CPU)."""
  try:
    return np.asarray(mesh_utils.create_device_mesh(tuple(shape), list(devices)))
  except Exception:  # noqa: BLE001 - mesh_utils raises assorted errors off-TPU
    return np.array(list(devices), dtype=object).reshape(tuple(shape))


def _group_into_slices(devices: Sequence[Any], num_slices: int) -> list[list[Any]]:
  """Split devices into slices: by host when hosts == slices, else contiguous chunks."""
  processes = sorted({getattr(d, "process_index", 0) for d in devices})
  if len(processes) == num_slices and num_slices > 1:
    groups = [[d for d in devices if getattr(d, "process_index", 0) == p] for p in processes]
    if len({len(g) for g in groups}) == 1:
      return groups
  per_slice = len(devices) // num_slices
  return [list(devices[i * per_slice : (i + 1) * per_slice]) for i in range(num_slices)]


def _hybrid_mesh(
  ici_shape: Sequence[int], dcn_shape: Sequence[int], devices: Sequence[Any]
) -> np.ndarray:
  """Lay out slices ourselves: axis i = dcn_i (outer) x ici_i (inner).

  Used where `create_hybrid_device_mesh` can't be (devices without
  `slice_index`, i.e. CPU test devices and GPU multi-host).
  """
  n = len(ici_shape)
  slices = _group_into_slices(devices, math.prod(dcn_shape))
  blocks = np.stack([_slice_mesh(ici_shape, s) for s in slices])
  # (num_slices, *ici) -> (*dcn, *ici): slice s sits at dcn coordinate unravel(s).
  blocks = blocks.reshape(tuple(dcn_shape) + tuple(ici_shape))
  # Interleave to (dcn_0, ici_0, dcn_1, ici_1, ...) then merge each pair.
  order = [k for i in range(n) for k in (i, n + i)]
  merged = tuple(d * i for d, i in zip(dcn_shape, ici_shape))
  return blocks.transpose(order).reshape(merged)


def create_mesh(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """Build a Mesh with axes `config.mesh_axes` (all AxisType.Auto).

  Sizes come from `ici_<axis>_parallelism` (within a slice) and
  `dcn_<axis>_parallelism` (across slices), default 1. One -1 among the ici
  keys is filled from devices-per-slice, one among the dcn keys from the
  number of slices the devices report.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("no devices to build a mesh from")
  axes = _mesh_axes(config)
  ici = _read_parallelism(config, "ici", axes)
  dcn = _read_parallelism(config, "dcn", axes)

  if -1 in dcn.values():
    detected = _detected_slices(devices)
    dcn = _fill(dcn, detected, f"{detected} slices (as the devices report)")
  num_slices = math.prod(dcn.values())
  if len(devices) % num_slices:
    described = " * ".join(f"{k}={v}" for k, v in dcn.items())
    raise ValueError(
      f"{described} = {num_slices} slices, which does not divide {len(devices)} devices"
    )
  per_slice = len(devices) // num_slices
  ici = _fill(
    ici, per_slice, f"{per_slice} devices per slice ({len(devices)} devices / {num_slices} slices)"
  )

  ici_shape = [ici[f"ici_{a}_parallelism"] for a in axes]
  dcn_shape = [dcn[f"dcn_{a}_parallelism"] for a in axes]
  if num_slices == 1:
    device_array = _slice_mesh(ici_shape, devices)
  elif all(hasattr(d, "slice_index") for d in devices):
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    device_array = _hybrid_mesh(ici_shape, dcn_shape, devices)
  return Mesh(device_array, axes, axis_types=(AxisType.Auto,) * len(axes))


def mesh_shape_string(mesh: Mesh) -> str:
  """One line for logs, e.g. `data=2 x fsdp=4 x tensor=1 (8 devices)`."""
  dims = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return f"{dims} ({mesh.devices.size} devices)"
