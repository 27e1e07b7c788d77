"""A module imported on its first attribute access.

Importing the kernel registry imports every kernel module on every host (each registers
itself); the Pallas backends they build on (Mosaic GPU, Triton, Mosaic TPU and splash) cost
0.02-0.14 s each to import, so a kernel module names its backend with `lazy_module` and
pays for it only when it builds a kernel.
"""

from __future__ import annotations

import importlib
import types


class _LazyModule(types.ModuleType):
  """Stands for module `name`; the first attribute read imports it (later reads too go to
  the imported module)."""

  def __getattr__(self, attribute: str):
    return getattr(importlib.import_module(self.__name__), attribute)


def lazy_module(name: str) -> types.ModuleType:
  """`import name`, deferred to its first use:
  `plgpu = lazy_module("jax.experimental.pallas.triton")`."""
  return _LazyModule(name)
