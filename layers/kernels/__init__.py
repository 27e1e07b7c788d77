"""Attention kernels: the contract (api), the registry that decides, the dispatch from a
layer's settings, the shard_map wrappers; implementations in train/ and decode/, shared
pieces in shared/. docs/kernels.md has the map and what a new kernel touches."""

# The registry first: importing it imports (and so registers) every kernel module, before
# any of them is imported on its own, half-way through another import.
from meshattn.layers.kernels import registry  # noqa: F401  pylint: disable=unused-import
