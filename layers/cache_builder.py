"""The cache a layer's settings call for: `Attention.init_cache` builds it here.

A linear-attention layer keeps a recurrent state per slot (LinearStateCache);
a softmax layer keeps K/V, in one page pool shared by the slots
(PagedKVCache) or in a contiguous buffer per slot (KVCache), which is a ring
of `sliding_window_size` entries on a sliding-window layer. Every kind is
placed on the layer's mesh by the cache's logical axis names.
"""

from __future__ import annotations

import jax

from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.state import LinearStateCache
from meshattn.layers.settings import AttentionSettings


def build_cache(settings: AttentionSettings, mesh: jax.sharding.Mesh | None, batch_size: int,
                max_length: int | None = None, *, for_prefill: bool = False,
                ring_buffer: bool | None = None,
                paged: bool | None = None) -> KVCache | PagedKVCache | LinearStateCache:
  """The cache for `batch_size` slots of up to `max_length` tokens (default
  max_target_length); the arguments are `Attention.init_cache`'s."""
  s = settings
  max_length = max_length or s.max_target_length
  placement = dict(mesh=mesh, rules=s.logical_axis_rules, axis_names=s.cache_axis_names)
  if s.linear is not None:  # a linear-attention layer keeps a state per slot, not K/V
    return LinearStateCache(batch_size, max_length, s.num_kv_heads, s.head_dim, **placement)
  if s.paged_kv_cache if paged is None else paged:
    return PagedKVCache(batch_size, max_length, s.num_kv_heads, s.head_dim,
                        num_pages=s.num_pages, tokens_per_page=s.tokens_per_page, dtype=s.dtype,
                        quant=s.kv_quant, **placement)
  ring = s.sliding_window_ring_buffer if ring_buffer is None else ring_buffer
  window = s.mask.window if s.mask.attention_type == "local_sliding" and ring else None
  return KVCache(batch_size, max_length, s.num_kv_heads, s.head_dim, dtype=s.dtype,
                 axis_order=s.prefill_cache_axis_order if for_prefill else s.ar_cache_axis_order,
                 window=window, quant=s.kv_quant, **placement)
