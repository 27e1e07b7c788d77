"""When a module's graph changes: the epoch that tells bound serving steps to split again.

`jit_step` (layers/serving.py) splits a module once and afterwards moves its
Variables' arrays on each call. Walking the graph on every call to see whether
it changed would cost about what the split costs (~30 us for a two-layer model
on a CPU host, against ~150 us of host time for a whole decode step), so the
modules note changes themselves: assigning a Variable, a module or a container
of them to an attribute of a meshattn module (a replaced parameter, a swapped
submodule, a new cache) moves the epoch, and a bound step whose epoch is older
splits its module again. Changing a value in place (`param[...] = x`,
`nnx.update`) needs nothing: the step reads each Variable's current array.
A module of another library (or of the user) reports nothing: after assigning
into one, call `structure_changed()`.
"""

from __future__ import annotations

from flax import nnx
from flax.nnx import graph

_epoch = [0]


def structure_changed() -> None:
  """Invalidate every bound serving step: each splits its module again on its next call."""
  _epoch[0] += 1


def epoch() -> int:
  return _epoch[0]


def _holds_graph(value) -> bool:
  """A Variable, a module, or a list / tuple / dict holding one (a List of layers)."""
  if isinstance(value, nnx.Variable) or graph.is_graph_node(value):
    return True
  if isinstance(value, (list, tuple)):
    return any(_holds_graph(v) for v in value)
  if isinstance(value, dict):
    return any(_holds_graph(v) for v in value.values())
  return False


class TracksGraph:
  """Mixin for meshattn's modules: assigning graph nodes to an attribute moves the epoch.

  Plain attributes (sizes, settings) do not, so a module that sets one during a call
  does not make the serving steps split again on every call."""

  def __setattr__(self, name: str, value) -> None:
    super().__setattr__(name, value)
    if _holds_graph(value):
      _epoch[0] += 1
