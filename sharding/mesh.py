"""Build the device mesh from the config's `ici_*` / `dcn_*` parallelism keys.

Sharding mode: every mesh axis is `jax.sharding.AxisType.Auto`. jax 0.10's
`jax.make_mesh` defaults to Explicit axes, which would make sharding part of
every array's type and force explicit `out_sharding`s through the layer; with
Auto axes the layer only hints placements with
`jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))` and leaves
the rest to the compiler. We therefore build `jax.sharding.Mesh` ourselves and
pass `axis_types` explicitly.

Layout: mesh axis `a` has size `dcn_a * ici_a`. The devices are split into
`prod(dcn_*)` equal groups (granules), one per dcn coordinate, and the dcn part
is outermost, so each group sits in a contiguous block of the inner ici part
of every axis and only the outer dcn part crosses the slow network. A group
is, in this order of preference (`device_groups`):

1. a slice (devices' `slice_index`, one ICI domain: a TPU slice), when the
   devices report exactly as many slices as the dcn keys ask for;
2. a process (`process_index`, one host), when there are exactly as many
   processes (as `mesh_utils.create_hybrid_device_mesh(...,
   process_is_granule=True)` does). This is the GPU and CPU multi-host case:
   their devices report `slice_index` 0 everywhere, one "slice";
3. with a single process only, contiguous blocks of the device list: there is
   no slow network to respect, and it lets one process stand in for several
   hosts (tests, trying a dcn layout on one machine).

Anything else raises, naming each grouping that was tried and why it did not
fit: silently cutting a multi-host job into the wrong groups would send ici
traffic over the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from meshattn.configs import vocabulary as vocab

__all__ = ["create_mesh", "device_groups", "mesh_devices", "mesh_shape_string"]


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
  """Replace at most one -1 so that the sizes multiply to `total`; check the product (the
  rule of configs/vocabulary.mesh_product_problem, which config validation also applies).

  `what` describes `total` in error messages (e.g. "8 devices per slice").
  """
  fill_keys = [k for k, v in sizes.items() if v == -1]
  if len(fill_keys) > 1:
    raise ValueError(f"only one of these may be -1, got -1 for {', '.join(fill_keys)}")
  problem = vocab.mesh_product_problem(sizes, total)
  if problem:
    named = fill_keys[0] if fill_keys else next((k for k, v in sizes.items() if v != 1), "mesh")
    raise ValueError(f"{named}: {problem} (the device count here: {what})")
  if fill_keys:
    fixed = math.prod(v for v in sizes.values() if v != -1)
    return {**sizes, fill_keys[0]: total // fixed}
  return dict(sizes)


def _group_by(devices: Sequence[Any], attr: str) -> list[list[Any]]:
  """Devices grouped by `attr`, groups sorted by its value, device order kept within."""
  groups: dict[Any, list[Any]] = {}
  for d in devices:
    groups.setdefault(getattr(d, attr, 0), []).append(d)
  return [groups[k] for k in sorted(groups)]


def _why_not(groups: list[list[Any]], wanted: int, what: str) -> str | None:
  """None when `groups` are `wanted` equal groups, else why not (for the error message).

  `what` is the plural ("slices", "processes").
  """
  sizes = [len(g) for g in groups]
  if len(groups) != wanted:
    return f"the devices report {len(groups)} {what}, not {wanted}"
  if len(set(sizes)) != 1:
    return f"the {what} hold unequal numbers of devices {sizes}"
  return None


def _slice_groups(devices: Sequence[Any]) -> list[list[Any]] | None:
  if all(hasattr(d, "slice_index") for d in devices):
    return _group_by(devices, "slice_index")
  return None


def _detected_groups(devices: Sequence[Any]) -> int:
  """What a dcn `-1` fills to: the number of slices when there are several, else of processes."""
  slices = _slice_groups(devices)
  if slices is not None and len(slices) > 1:
    return len(slices)
  return len(_group_by(devices, "process_index"))


def device_groups(devices: Sequence[Any], num_groups: int) -> tuple[str, list[list[Any]]]:
  """Split `devices` into `num_groups` equal dcn groups: ("slice" | "process" | "block", groups).

  See the module docstring for the order; raises ValueError naming every
  grouping tried when none fits.
  """
  devices = list(devices)
  if num_groups == 1:
    return "block", [devices]
  tried = []
  slices = _slice_groups(devices)
  if slices is None:
    tried.append("slices: the devices have no slice_index")
  else:
    why = _why_not(slices, num_groups, "slices")
    if why is None:
      return "slice", slices
    tried.append(f"slices: {why}")
  processes = _group_by(devices, "process_index")
  why = _why_not(processes, num_groups, "processes")
  if why is None:
    return "process", processes
  tried.append(f"processes: {why}")
  if len(processes) == 1:
    if len(devices) % num_groups == 0:
      per = len(devices) // num_groups
      return "block", [devices[i * per : (i + 1) * per] for i in range(num_groups)]
    tried.append(f"blocks of one process: {num_groups} does not divide {len(devices)} devices")
  raise ValueError(
    f"the dcn_* keys ask for {num_groups} device groups (slices or hosts), but no grouping "
    f"fits: {'; '.join(tried)}. Set the product of dcn_* to the number of slices or processes"
  )


def _slice_mesh(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Arrange one group's devices; a plain reshape where mesh_utils can't (CPU, fakes)."""
  try:
    return np.asarray(mesh_utils.create_device_mesh(tuple(shape), list(devices)))
  except Exception:  # noqa: BLE001 - mesh_utils raises assorted errors off-TPU
    return np.array(list(devices), dtype=object).reshape(tuple(shape))


def _hybrid_mesh(
  ici_shape: Sequence[int], dcn_shape: Sequence[int], groups: Sequence[Sequence[Any]]
) -> np.ndarray:
  """Axis i = dcn_i (outer) x ici_i (inner), group g at dcn coordinate unravel(g).

  The same layout as `mesh_utils.create_hybrid_device_mesh` (each granule
  through `create_device_mesh`, then blocked), written out so that it also
  takes process groups and blocks and is testable with fake devices.
  """
  n = len(ici_shape)
  blocks = np.stack([_slice_mesh(ici_shape, g) for g in groups])
  # (num_groups, *ici) -> (*dcn, *ici).
  blocks = blocks.reshape(tuple(dcn_shape) + tuple(ici_shape))
  # Interleave to (dcn_0, ici_0, dcn_1, ici_1, ...) then merge each pair.
  order = [k for i in range(n) for k in (i, n + i)]
  merged = tuple(d * i for d, i in zip(dcn_shape, ici_shape))
  return blocks.transpose(order).reshape(merged)


def mesh_devices(config: Any, devices: Sequence[Any]) -> tuple[tuple[str, ...], np.ndarray]:
  """(axis names, device array) for `config` over `devices`: `create_mesh` without the Mesh,
  so that the layout can be checked with fake device objects."""
  devices = list(devices)
  if not devices:
    raise ValueError("no devices to build a mesh from")
  axes = _mesh_axes(config)
  ici = _read_parallelism(config, "ici", axes)
  dcn = _read_parallelism(config, "dcn", axes)

  if -1 in dcn.values():
    detected = _detected_groups(devices)
    dcn = _fill(dcn, detected, f"{detected} slices or processes (as the devices report)")
  num_groups = math.prod(dcn.values())
  if len(devices) % num_groups:
    described = " * ".join(f"{k}={v}" for k, v in dcn.items())
    raise ValueError(
      f"{described} = {num_groups} device groups, which does not divide {len(devices)} devices"
    )
  kind, groups = device_groups(devices, num_groups)
  per_group = len(groups[0])
  if num_groups == 1:
    what = f"{per_group} devices"
  else:
    unit, units = {"slice": ("slice", "slices"), "process": ("process", "processes")}.get(
      kind, ("dcn group", "dcn groups"))
    what = f"{per_group} devices per {unit} ({len(devices)} devices / {num_groups} {units})"
  ici = _fill(ici, per_group, what)
  ici_shape = [ici[f"ici_{a}_parallelism"] for a in axes]
  dcn_shape = [dcn[f"dcn_{a}_parallelism"] for a in axes]
  if num_groups == 1:
    return axes, _slice_mesh(ici_shape, devices)
  return axes, _hybrid_mesh(ici_shape, dcn_shape, groups)


def create_mesh(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """Build a Mesh with axes `config.mesh_axes` (all AxisType.Auto).

  Sizes come from `ici_<axis>_parallelism` (within a slice or host) and
  `dcn_<axis>_parallelism` (across slices or hosts), default 1. One -1 among
  the ici keys is filled from the devices per group, one among the dcn keys
  from the number of slices (several) or else processes the devices report.
  """
  devices = jax.devices() if devices is None else devices
  axes, device_array = mesh_devices(config, devices)
  return Mesh(device_array, axes, axis_types=(AxisType.Auto,) * len(axes))


def mesh_shape_string(mesh: Mesh) -> str:
  """One line for logs, e.g. `data=2 x fsdp=4 x tensor=1 (8 devices)`."""
  dims = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return f"{dims} ({mesh.devices.size} devices)"
