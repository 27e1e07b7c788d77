"""Attention kernels: the contract (api), the registry that decides, the dispatch from a
layer's settings, the shard_map wrappers; implementations in train/ and decode/, shared
pieces in shared/. docs/kernels.md has the map and what a new kernel touches."""
