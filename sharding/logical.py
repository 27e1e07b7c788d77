"""Logical axis names -> PartitionSpecs / NamedShardings, for activations and params.

Code names tensor dimensions by role ("activation_batch", "embed", ...) and the
config's `logical_axis_rules` decide which mesh axes each role uses, so one
layer serves every mesh layout without code changes.

Rule semantics (the same as the comments in configs/base.yml): rules are a
sequence of `(logical_name, axes)` with `axes` a mesh axis name, a sequence of
names, or None. For each dimension of a tensor the rules for its name are
tried in order:

* a rule with axes None means "replicated" and stops the search;
* mesh axes of size 1 are dropped (they shard nothing), and a rule left empty
  is skipped;
* a rule is skipped if one of its axes already shards an earlier dimension of
  the same tensor (a mesh axis may appear only once in a PartitionSpec);
* when the shape is known, a rule is skipped if its total axis size does not
  divide the dimension;
* the first surviving rule wins; no surviving rule (or an unknown name, or a
  None name) means replicated.

Rules are validated lazily: an axis missing from the mesh raises only when a
rule naming it is consulted, so one rule set can serve meshes that lack some
axes as long as the tensors in play never reach those rules.

Sharding mode: meshes use `AxisType.Auto` axes (see `mesh.py`), so placement
is a hint to the compiler: activations go through
`jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))` (`constrain`)
and parameters are placed with `jax.device_put` or, at creation, with the
same constraint inside `nnx.jit` (`create_sharded`).

Parameters carry their logical names as NNX variable metadata under the key
`logical_axes`, e.g. `nnx.Param(value, logical_axes=("embed", "q_heads", "kv_head_dim"))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
  "LOGICAL_AXES_KEY",
  "logical_to_spec",
  "logical_to_sharding",
  "constrain",
  "get_param_specs",
  "get_param_shardings",
  "shard_module",
  "create_sharded",
]

LOGICAL_AXES_KEY = "logical_axes"
"""Variable metadata key that holds a parameter's logical axis names."""

Rules = Sequence[tuple[str, Any]]


def _rule_axes(axes: Any) -> tuple[str, ...] | None:
  """Normalise a rule's axes to a tuple of names; None (or []) = replicated."""
  if axes is None:
    return None
  if isinstance(axes, str):
    return (axes,)
  axes = tuple(axes)
  return axes or None


def _check_axes_in_mesh(name: str, axes: tuple[str, ...], mesh: Mesh) -> None:
  for axis in axes:
    if axis not in mesh.axis_names:
      raise ValueError(
        f"logical axis rule {name!r} -> {axes} names mesh axis {axis!r}, "
        f"which is not in mesh.axis_names {tuple(mesh.axis_names)}"
      )


def _resolve_dim(
  name: str | None, rules: Rules, mesh: Mesh | None, used: set[str], dim: int | None
) -> tuple[str, ...]:
  """The mesh axes for one dimension (empty tuple = replicated)."""
  if name is None:
    return ()
  for rule_name, raw_axes in rules:
    if rule_name != name:
      continue
    axes = _rule_axes(raw_axes)
    if axes is None:
      return ()
    if mesh is not None:
      _check_axes_in_mesh(name, axes, mesh)
      axes = tuple(a for a in axes if mesh.shape[a] != 1)
    if not axes or used.intersection(axes):
      continue
    if dim is not None and mesh is not None:
      if dim % math.prod(mesh.shape[a] for a in axes):
        continue
    return axes
  return ()


def logical_to_spec(
  logical_names: Sequence[str | None],
  rules: Rules,
  mesh: Mesh | None = None,
  shape: Sequence[int] | None = None,
) -> PartitionSpec:
  """PartitionSpec for a tensor whose dimensions have these logical names.

  Without a mesh no axis is dropped or size-checked (sizes are unknown), so
  pass the mesh whenever you have it. `shape` enables the divisibility check.
  """
  logical_names = tuple(logical_names)
  if shape is not None and len(shape) != len(logical_names):
    raise ValueError(
      f"logical names {logical_names} ({len(logical_names)} dims) do not "
      f"match shape {tuple(shape)} ({len(shape)} dims)"
    )
  used: set[str] = set()
  entries = []
  for i, name in enumerate(logical_names):
    dim = None if shape is None else shape[i]
    axes = _resolve_dim(name, rules, mesh, used, dim)
    used.update(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def logical_to_sharding(
  names: Sequence[str | None], mesh: Mesh, rules: Rules, shape: Sequence[int] | None = None
) -> NamedSharding:
  """NamedSharding on `mesh` for a tensor with these logical dimension names."""
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def constrain(
  x: jax.Array, names: Sequence[str | None] | None, mesh: Mesh | None, rules: Rules
) -> jax.Array:
  """Hint that `x` should be laid out by its logical names (no-op without a mesh).

  Letting `mesh` or `names` be None keeps unsharded (single-device) callers
  free of branches.
  """
  if mesh is None or names is None:
    return x
  names = tuple(names)
  if len(names) != x.ndim:
    raise ValueError(
      f"constrain: {len(names)} logical names {names} for an array of "
      f"rank {x.ndim} (shape {tuple(x.shape)})"
    )
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, mesh, rules, x.shape))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _as_state(module_or_state: Any) -> Any:
  if isinstance(module_or_state, nnx.Module):
    return nnx.state(module_or_state)
  return module_or_state


def _leaf_spec(path: Any, leaf: Any, mesh: Mesh, rules: Rules) -> PartitionSpec:
  """Spec for one state leaf: from its `logical_axes` metadata, else replicated."""
  if not _is_variable(leaf):
    return PartitionSpec()
  names = leaf.get_metadata().get(LOGICAL_AXES_KEY)
  if names is None:
    return PartitionSpec()
  shape = tuple(getattr(leaf.get_value(), "shape", ()))
  if len(names) != len(shape):
    raise ValueError(
      f"parameter {jax.tree_util.keystr(path)} has {LOGICAL_AXES_KEY}="
      f"{tuple(names)} but shape {shape}"
    )
  return logical_to_spec(names, rules, mesh, shape)


def get_param_specs(module_or_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """PartitionSpecs for every variable, as an nnx.State shaped like `nnx.state(module)`.

  Each Variable becomes a PartitionSpec leaf, which is a tree prefix of the
  state, so the result (or its NamedSharding twin) can be passed straight to
  `jax.device_put` / `with_sharding_constraint` alongside the state. Works on
  abstract states (`nnx.eval_shape`) too, since only shapes are read.
  """
  state = _as_state(module_or_state)
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: _leaf_spec(path, leaf, mesh, rules), state, is_leaf=_is_variable
  )


def get_param_shardings(module_or_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """Like `get_param_specs`, with NamedShardings on `mesh` as the leaves."""
  specs = get_param_specs(module_or_state, mesh, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
  """Move an existing module's variables onto their shardings, in place."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, get_param_shardings(state, mesh, rules)))
  return module


def create_sharded(
  constructor: Callable[..., nnx.Module], mesh: Mesh, rules: Rules, *args: Any
) -> nnx.Module:
  """Build `constructor(*args)` inside `nnx.jit` with its parameters born sharded.

  Constraining the state inside the jit lets XLA materialise each parameter
  directly in its shards, so no device ever holds a full unsharded copy.
  `args` are traced by `nnx.jit` (pass an `nnx.Rngs` here rather than
  capturing one in the constructor: a captured Rngs cannot be advanced inside
  the trace); bind Python config values with `functools.partial` instead.
  """

  @nnx.jit
  def build(*traced_args):
    module = constructor(*traced_args)
    state = nnx.state(module)
    shardings = get_param_shardings(state, mesh, rules)
    nnx.update(module, jax.lax.with_sharding_constraint(state, shardings))
    return module

  return build(*args)
