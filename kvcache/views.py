"""Typed views a cache hands the decode kernels: its arrays and their logical axes.

A decode kernel takes `kernel(query [rows, N, H], **view.arrays(), **view.static_args(...))`
(layers/kernels/api.py). The view says which array is which and names each array's
dimensions with the cache's logical axis names, so the sharded dispatch
(layers/kernels/sharded.py) reads every PartitionSpec from the view: a dimension named
`batch_name` follows the queries' batch sharding, one named `heads_name` their head
sharding (when it is split at all), every other dimension is replicated.

Kinds: `ContiguousView` (KVCache, a ring buffer included) and `PagedView`
(PagedKVCache). A new cache kind adds its view here and returns it from `decode_view`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

# (array name, its logical axis names), hashable: a view's static metadata.
Axes = tuple[tuple[str, tuple[str | None, ...]], ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _View:
  """What every view has: named arrays (None where absent) with logical axes (static)."""

  axes: Axes = ()  # (array name, its logical axis names) for every array, in keyword order
  batch_name: str | None = None  # the logical name that follows the queries' batch sharding
  heads_name: str | None = None  # the one that follows their head sharding (split > 1 only)
  # Rows are cache slots: a step on some slots scatters its queries into a [B] batch.
  by_slot: bool = False
  # A ring buffer holds exactly the window: the kernel reads it whole, with no window mask.
  holds_window: bool = False

  def arrays(self) -> dict[str, jax.Array | None]:
    """The kernel's keyword arguments (None where the cache has no such array)."""
    return {name: getattr(self, name) for name, _ in self.axes}

  def logical_axes(self, name: str) -> tuple[str | None, ...]:
    return dict(self.axes)[name]


def _view(data_fields: list[str]):
  meta = ["axes", "batch_name", "heads_name", "by_slot", "holds_window"]

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta)

  return wrap


@_view(["key", "value", "lengths", "key_scale", "value_scale"])
class ContiguousView(_View):
  """Every slot's entries as stored, logical order: row b of the kernel is cache slot b."""

  key: jax.Array  # [B, C, K, H]
  value: jax.Array  # [B, C, K, H]
  lengths: jax.Array  # [B]: row b reads entries [0, lengths[b]) (0: the row is skipped)
  key_scale: jax.Array | None  # [B, K or 1, C] float32 when quantized
  value_scale: jax.Array | None
  by_slot: bool = True

  def static_args(self, options) -> dict[str, Any]:
    """The kernel's static keywords besides scale / soft cap / sinks."""
    mask = options.mask
    window = mask.window
    return {"window": None if self.holds_window else window}


@_view(["key_pages", "value_pages", "page_table", "lengths", "page_owner", "slots", "key_scale",
        "value_scale"])
class PagedView(_View):
  """The shared page pool and the step rows' page tables: row b of the kernel is step row b."""

  key_pages: jax.Array  # [P, tpp, K, H]
  value_pages: jax.Array  # [P, tpp, K, H]
  page_table: jax.Array  # [b, M]: the rows' pages
  lengths: jax.Array  # [b]
  page_owner: jax.Array  # [P]: kernels read only the row's own pages
  slots: jax.Array  # [b]: the cache slot of each row
  key_scale: jax.Array | None  # [P, tpp, K or 1] float32 when quantized
  value_scale: jax.Array | None

  def static_args(self, options) -> dict[str, Any]:
    del options  # no window: paged kernels serve causal masks only (registry features)
    return {}
