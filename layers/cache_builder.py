"""The cache a layer's settings call for: `Attention.init_cache` builds it here.

`settings.cache` (layers/cache_specs.py) is a tagged choice and this builds
what it says: a linear-attention layer's recurrent state per slot
(StateCache -> LinearStateCache); a softmax layer's K/V in one page pool
shared by the slots (PagedCache -> PagedKVCache) or in a contiguous buffer
per slot (ContiguousCache -> KVCache), which is a ring of
`sliding_window_size` entries on a sliding-window layer. Every kind is placed
on the layer's mesh by the cache's logical axis names.

`init_caches` is what `Attention.init_cache` and `Decoder.init_cache` call: it
builds every layer's cache before keeping any, so an error in one (a hybrid
model's softmax layer refusing what its linear layers took) leaves every
layer's cache as it was.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Protocol

import jax

from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.state import LinearStateCache
from meshattn.layers.cache_specs import ContiguousCache, PagedCache, StateCache
from meshattn.layers.serving import structure_changed
from meshattn.layers.settings import AttentionSettings

Cache = KVCache | PagedKVCache | LinearStateCache


class CachedLayer(Protocol):
  """What init_caches reads and sets on a layer (an `Attention`)."""
  settings: AttentionSettings
  mesh: jax.sharding.Mesh | None
  cache: Cache | None


def init_caches(layers: Sequence[CachedLayer], batch_size: int, max_length: int | None = None,
                **kind) -> list[Cache]:
  """Build each layer's cache (`build_cache`; `kind` is its for_prefill / ring_buffer /
  paged), then keep them all: a failure in any leaves every layer's cache in place."""
  built = [build_cache(layer.settings, layer.mesh, batch_size, max_length, **kind)
           for layer in layers]
  structure_changed()  # serving steps bound to these layers must split them again
  for layer, cache in zip(layers, built, strict=True):
    layer.cache = cache
  return built


def build_cache(settings: AttentionSettings, mesh: jax.sharding.Mesh | None, batch_size: int,
                max_length: int | None = None, *, for_prefill: bool = False,
                ring_buffer: bool | None = None,
                paged: bool | None = None) -> Cache:
  """The cache for `batch_size` slots of up to `max_length` tokens (default
  max_target_length); the arguments are `Attention.init_cache`'s: `paged` and
  `ring_buffer` pick another kind than `settings.cache` (settings.cache_for),
  `for_prefill` the contiguous cache's prefill axis order."""
  s = settings
  spec = s.cache_for(paged=paged, ring_buffer=ring_buffer)
  # Checked here, naming init_cache's arguments: a float would reach an array shape, and 0
  # is not "the default" (None is).
  for name, value in (("batch_size", batch_size), ("max_length", max_length)):
    if value is None and name == "max_length":
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"init_cache: {name} must be an integer >= 1"
                       f"{' or None (max_target_length)' if name == 'max_length' else ''}, "
                       f"got {value!r}")
  max_length = s.lengths.max_target_length if max_length is None else int(max_length)
  batch_size = int(batch_size)
  sizes = (batch_size, max_length, s.shape.num_kv_heads, s.shape.head_dim)
  placement = dict(mesh=mesh, rules=s.sharding.logical_axis_rules,
                   axis_names=spec.cache_axis_names)
  if for_prefill and isinstance(spec, PagedCache):
    raise ValueError("init_cache(for_prefill=True) picks prefill_cache_axis_order, which only a "
                     f"contiguous cache has; this layer's cache is paged ({spec})")
  # The paged decode kernel reads page pools only: a contiguous decode cache under it would
  # be refused at the first decode step, so say it now, naming the key. (A prefill cache is
  # never decoded: it is inserted into pages.)
  if isinstance(spec, ContiguousCache) and not for_prefill and s.kernel.decode_attention == "paged":
    raise ValueError("decode_attention='paged' reads a paged cache only, and this init_cache "
                     "builds a contiguous one: set paged_kv_cache true (or init_cache(paged=True)),"
                     " or choose another decode_attention")
  match spec:
    case StateCache():  # a linear-attention layer keeps a state per slot, not K/V
      return LinearStateCache(*sizes, **placement)
    case PagedCache(num_pages=num_pages, tokens_per_page=tokens_per_page):
      return PagedKVCache(*sizes, num_pages=num_pages, tokens_per_page=tokens_per_page,
                          dtype=s.dtype, quant=spec.kv_quant, **placement)
    case ContiguousCache(sliding_window_ring_buffer=ring):
      window = s.mask.window if ring else None
      return KVCache(*sizes, dtype=s.dtype, axis_order=spec.axis_order(for_prefill),
                     window=window, quant=spec.kv_quant, **placement)
  raise TypeError(f"settings.cache={spec!r}: not a cache kind this builder knows")
