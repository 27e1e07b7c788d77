"""The cache a layer keeps, as a tagged choice: what `Attention.init_cache` builds.

    ContiguousCache  K/V in one buffer per slot, [B, S, K, H] in a chosen memory order
                     (one for a cache built for prefill, one for decode); on a
                     sliding-window layer a ring of sliding_window_size entries unless
                     the ring is off
    PagedCache       K/V in one pool of num_pages pages of tokens_per_page tokens shared
                     by the slots (a page table per slot); every token is kept
    StateCache       linear attention's recurrent state per slot, no K/V (layers/linear)

Each kind holds only its own knobs, so a paged cache with a ring buffer or an axis
order cannot be written. The flat keys refuse `ar_cache_axis_order` and
`sliding_window_ring_buffer=True` with `paged_kv_cache` (the ring's key is unset by
default: a ring where the cache is contiguous); `prefill_cache_axis_order` stays, for a
contiguous prefill cache. Field names are the config keys, so an error names the key
either way. `AttentionSettings(cache=PagedCache(...))` (or `Attention(..., cache=...)`)
sets the KV kinds in one typed value; the flat keywords and config keys build the same
spec (`settings.cache`, through `cache_spec` below). Chunked prefill is a prefill
policy of every kind, so it lives in `settings.lengths`, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence, Union

from meshattn.configs import vocabulary as vocab
from meshattn.configs.validation import check_values
from meshattn.kvcache.base import CACHE_AXIS_NAMES
from meshattn.kvcache.quant import KVQuant

_IDENTITY = vocab.DEFAULT_CACHE_AXIS_ORDER


def _axis_order(name: str, order: Sequence[int]) -> tuple[int, ...]:
  """The order as a hashable tuple, or ValueError naming `name` (a config key)."""
  if not vocab.is_axis_permutation(order):
    raise ValueError(f"{name}={order}: must be a permutation of the ints (0, 1, 2, 3)")
  return tuple(int(a) for a in order)


def _axis_names(names: Sequence[str]) -> tuple[str, ...]:
  if len(names) != len(vocab.CACHE_DIMS) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"cache_axis_names={names}: need 4 logical names "
                     f"({', '.join(vocab.CACHE_DIMS)})")
  return tuple(names)


def _kv_quant(value: Any) -> None:
  if value is not None and not isinstance(value, KVQuant):
    raise ValueError(f"kv_quant={value!r}: must be a KVQuant (meshattn.kvcache.quant) or None")


@dataclasses.dataclass(frozen=True)
class ContiguousCache:
  """One K/V buffer per slot (kvcache.KVCache)."""

  kind: ClassVar[str] = "contiguous"
  # Memory order of [batch, sequence, kv heads, head_dim]: for a cache built with
  # init_cache(for_prefill=True), and for the decode cache.
  prefill_cache_axis_order: tuple[int, ...] = _IDENTITY
  ar_cache_axis_order: tuple[int, ...] = _IDENTITY
  # On a local_sliding layer keep only the last sliding_window_size entries (a ring).
  sliding_window_ring_buffer: bool = True
  cache_axis_names: tuple[str, ...] = CACHE_AXIS_NAMES
  kv_quant: KVQuant | None = None  # None: full precision

  def __post_init__(self):
    for name in ("prefill_cache_axis_order", "ar_cache_axis_order"):
      object.__setattr__(self, name, _axis_order(name, getattr(self, name)))
    object.__setattr__(self, "cache_axis_names", _axis_names(self.cache_axis_names))
    _kv_quant(self.kv_quant)

  def axis_order(self, for_prefill: bool) -> tuple[int, ...]:
    return self.prefill_cache_axis_order if for_prefill else self.ar_cache_axis_order


@dataclasses.dataclass(frozen=True)
class PagedCache:
  """One page pool shared by every slot (kvcache.PagedKVCache); pages are reserved on the
  host before each step (`cache.reserve_for_step`)."""

  kind: ClassVar[str] = "paged"
  num_pages: int = 64
  tokens_per_page: int = 16
  cache_axis_names: tuple[str, ...] = CACHE_AXIS_NAMES
  kv_quant: KVQuant | None = None  # None: full precision

  def __post_init__(self):
    check_values((("num_pages", self.num_pages), ("tokens_per_page", self.tokens_per_page)))
    object.__setattr__(self, "cache_axis_names", _axis_names(self.cache_axis_names))
    _kv_quant(self.kv_quant)


@dataclasses.dataclass(frozen=True)
class StateCache:
  """Linear attention's recurrent state per slot (kvcache.LinearStateCache)."""

  kind: ClassVar[str] = "linear_state"
  kv_quant: ClassVar[None] = None  # the state is kept in float32, never quantized
  cache_axis_names: tuple[str, ...] = CACHE_AXIS_NAMES

  def __post_init__(self):
    object.__setattr__(self, "cache_axis_names", _axis_names(self.cache_axis_names))


CacheSpec = Union[ContiguousCache, PagedCache, StateCache]
# What `cache=` takes: the K/V kinds (a linear layer keeps its state whatever is chosen,
# as with paged_kv_cache in a hybrid config).
KV_CACHE_SPECS = (ContiguousCache, PagedCache)
# The flat keywords (and config keys, kv_quant aside) a KV cache spec stands for.
CACHE_KEYWORDS: tuple[str, ...] = (
    "paged_kv_cache", "num_pages", "tokens_per_page", "prefill_cache_axis_order",
    "ar_cache_axis_order", "sliding_window_ring_buffer", "cache_axis_names", "kv_quant")


def cache_spec(keywords: Mapping[str, Any], *, linear: bool, paged: bool | None = None,
               ring_buffer: bool | None = None) -> CacheSpec:
  """The spec the flat cache keywords (CACHE_KEYWORDS) describe; `paged` / `ring_buffer`
  are `init_cache`'s overrides (None: the keywords' choice).

  Raises ValueError naming the keys that ask for what the chosen kind does not have.
  """
  k = keywords
  orders = {name: _axis_order(name, k[name])
            for name in ("prefill_cache_axis_order", "ar_cache_axis_order")}
  if linear:  # the KV keys are the softmax layers' (a hybrid config sets them for all)
    return StateCache(k["cache_axis_names"])
  # The decode cache's layout with a paged decode cache is a contradiction of the keys
  # themselves; the prefill order still lays out a contiguous prefill cache
  # (init_cache(paged=False, for_prefill=True)) whose sequences are inserted into pages.
  problem = k["paged_kv_cache"] and vocab.paged_axis_order_problem(orders["ar_cache_axis_order"])
  if problem:
    raise ValueError(f"ar_cache_axis_order={orders['ar_cache_axis_order']} with "
                     f"paged_kv_cache=True: {problem}")
  ring_key = k["sliding_window_ring_buffer"]
  if ring_key is not None and not isinstance(ring_key, bool):
    raise ValueError(f"sliding_window_ring_buffer={ring_key!r}: must be True, False or None "
                     "(unset: a ring where the cache is contiguous)")
  # A ring asked for in so many words beside pages is the same kind of contradiction; unset
  # (None) it means "a ring where the cache is contiguous".
  problem = vocab.paged_ring_problem(k["paged_kv_cache"], ring_key)
  if problem:
    raise ValueError(f"sliding_window_ring_buffer=True with paged_kv_cache=True: {problem}")
  if k["paged_kv_cache"] if paged is None else paged:
    # init_cache(paged=True) on a contiguous layer: its orders and ring lay out the contiguous
    # kind it builds otherwise; the page pool has none, so they do not apply here.
    source = "paged_kv_cache=True" if paged is None else "init_cache(paged=True)"
    if ring_buffer is not None:
      raise ValueError(f"init_cache(ring_buffer={ring_buffer}) with {source}: the ring buffer "
                       "is the contiguous cache's; a paged cache keeps every token in its pages")
    return PagedCache(k["num_pages"], k["tokens_per_page"], k["cache_axis_names"], k["kv_quant"])
  ring = ring_key if ring_buffer is None else ring_buffer
  ring = True if ring is None else ring  # unset: a sliding-window layer keeps a ring
  return ContiguousCache(orders["prefill_cache_axis_order"], orders["ar_cache_axis_order"], ring,
                         k["cache_axis_names"], k["kv_quant"])


def cache_keywords(spec: CacheSpec) -> dict[str, Any]:
  """The flat keywords that build `spec` (the other kind's knobs keep their defaults)."""
  if not isinstance(spec, KV_CACHE_SPECS):
    raise ValueError(f"cache={spec!r}: allowed ContiguousCache(...) or PagedCache(...) "
                     "(a linear-attention layer keeps its recurrent state: StateCache is not "
                     "chosen, it follows from attention_type linear)")
  fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
  return {"paged_kv_cache": isinstance(spec, PagedCache), **fields}
