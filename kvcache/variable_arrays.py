"""Read and replace a Variable's array without its get / set hooks.

Host-side code that runs between serving steps (the serving wrapper, `reset`)
moves whole arrays in and out of Variables, as `nnx.split` / `nnx.merge` do.
`get_value` / `set_value` would copy through `jax.tree.map` (~20 us per
Variable per call on a CPU host), most of a small step's or a reset's host
time. A Variable holding an array ref is read and written through the ref.
"""

from __future__ import annotations

from flax import nnx
from flax.nnx.variablelib import is_array_ref


def holds_ref(variable: nnx.Variable) -> bool:
  return is_array_ref(variable.get_raw_value())


def read(variable: nnx.Variable, ref: bool | None = None):
  """The variable's array (`ref`: whether it holds a ref, if already known)."""
  raw = variable.get_raw_value()
  return raw[...] if (is_array_ref(raw) if ref is None else ref) else raw


def replace(variable: nnx.Variable, array, ref: bool | None = None, *,
            checked: bool = False) -> None:
  """Make `array` the variable's value (the old buffer may have been donated: never read).

  checked: the caller has already asked `can_update` in this context, so the Variable's
  own trace-level check (~10 us on a CPU host, run twice by `set_raw_value`) is skipped.
  """
  if ref if ref is not None else holds_ref(variable):
    variable.get_raw_value()[...] = array
  elif checked:
    object.__setattr__(variable, "_raw_value", array)
  else:
    variable.set_raw_value(array)


def can_update(variables) -> None:
  """Raise (as a Variable's own setter would) if these Variables, created at one trace
  level, cannot be written from the current one: one check for all of them."""
  for variable in variables[:1]:
    variable._check_can_update()
