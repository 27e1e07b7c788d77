"""When a module's graph changes: the epoch that tells bound serving steps to look again.

`jit_step` (layers/serving.py) splits a module once and afterwards moves its
Variables' arrays on each call. Walking the graph on every call to see whether
it changed would cost about what the split costs (~30 us for a two-layer model
on a CPU host, against ~150 us of host time for a whole decode step), so the
modules note changes themselves: any attribute assigned to a meshattn module
(a replaced parameter, a swapped submodule, a new cache, `eval()` /
`set_attributes` flags, which the compiled graph holds as static values) and any
item assigned to a `TrackedList` (Decoder.blocks) moves one global epoch. A bound
step that sees a newer epoch splits its module again and keeps its compiled
function when the graph is the same (the change was elsewhere, e.g. another
module being built), so an unrelated change costs one split, never a retrace.
meshattn's modules assign no attribute while they run, so steps leave the epoch
alone. Changing a value in place (`param[...] = x`, `nnx.update`) needs nothing:
the step reads each Variable's current array. A module of another library (or of
the user) reports nothing: after changing one, call `structure_changed()`.
"""

from __future__ import annotations

from flax import nnx

_epoch = [0]


def structure_changed() -> None:
  """Tell every bound serving step to split its module again on its next call."""
  _epoch[0] += 1


def epoch() -> int:
  return _epoch[0]


class TracksGraph:
  """Mixin for meshattn's modules: assigning or deleting an attribute moves the epoch."""

  def __setattr__(self, name: str, value) -> None:
    super().__setattr__(name, value)
    _epoch[0] += 1

  def __delattr__(self, name: str) -> None:
    super().__delattr__(name)
    _epoch[0] += 1


class TrackedList(TracksGraph, nnx.List):
  """An nnx.List whose item assignments, insertions and deletions move the epoch."""

  def __setitem__(self, index, value) -> None:
    super().__setitem__(index, value)
    _epoch[0] += 1

  def __delitem__(self, index) -> None:
    super().__delitem__(index)
    _epoch[0] += 1

  def insert(self, index, value) -> None:
    super().insert(index, value)
    _epoch[0] += 1
