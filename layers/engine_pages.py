"""The engine's page tables: allocated once on the host, written to every layer in one call.

Each layer of the model has its own PagedKVCache with its own page pool, and
every layer makes the same choices (the same slots reserve and free the same
amounts in the same order). `PagedKVCache.reserve_for_step` / `free` manage
one cache: each call reads that cache's tables back from the devices and
places them again, so a model of L layers pays ~5 L small dispatches and
syncs per arriving or finishing request. Measured on CPU (tiny-lm, 8
devices): `free` was half of the serving loop's time when it did.

`EnginePages` keeps the tables once, on the host, and applies the cache's own
policy to them (kvcache/page_plan.py: pages of a slot in logical order,
lowest free id first, all-or-nothing), and `push` writes the changes to every
layer in one compiled call of fixed shapes: page table [S, M] and owner [P]
replaced, then each cache's `clear_freed` (freed pages' K/V zeroed, scales
reset to 1, released slots' lengths 0, as `free` does), so a reused page
never holds its previous owner's data. The device tables stay the truth that
the step checks (`PAGES_NOT_RESERVED`), and they stay readable by the
cache's own API (`num_free_pages`, `pages_of`). A hybrid model's linear layers
keep a LinearStateCache (a fixed state per slot, no pages): it takes no
tables, and its `clear_freed` forgets the released slots' states.
"""

from __future__ import annotations

import jax
import numpy as np

from meshattn.kvcache import page_plan
from meshattn.kvcache.paged import PagedKVCache
from meshattn.layers.serving import caches_of, jit_step
from meshattn.sharding.multihost import host_copy


def _apply_pages(model, table, owner, freed, released):
  """Every paged cache of `model`: tables <- table [S, M], owner [P]; then, in every cache,
  the pages in `freed` [P] cleared and the slots in `released` [S] emptied (`clear_freed`:
  a linear layer's state cache has no pages and forgets its released slots)."""
  for cache in caches_of(model):
    if isinstance(cache, PagedKVCache):
      cache.page_table[...] = table  # [S, M]
      cache.page_owner[...] = owner  # [P]
    cache.clear_freed(freed, released)


class EnginePages:
  """Host page tables for the caches of one model (see module doc)."""

  def __init__(self, caches):
    """caches: the model's caches, paged ones first or not (a hybrid model's linear
    layers keep LinearStateCaches, which have slots but no pages)."""
    first = next(c for c in caches if isinstance(c, PagedKVCache))
    self.num_slots, self.num_pages = first.batch_size, first.num_pages
    self.tokens_per_page, self.max_length = first.tokens_per_page, first.max_length
    self.max_pages_per_sequence = first.max_pages_per_sequence
    for cache in caches:  # host_copy: on several processes, every one reads the whole table
      owned = isinstance(cache, PagedKVCache) and (host_copy(cache.page_owner[...]) != -1).any()
      if owned or (host_copy(cache.lengths[...]) > 0).any():
        raise ValueError("EnginePages needs empty caches (a fresh init_cache)")
    self.owner = np.full((self.num_pages,), page_plan.FREE, np.int32)  # [P] slot owning each page
    self.table = np.full((self.num_slots, self.max_pages_per_sequence), page_plan.FREE,
                         np.int32)  # [S, M]
    self._freed = np.zeros((self.num_pages,), bool)  # [P] since the last push
    self._released = np.zeros((self.num_slots,), bool)  # [S] since the last push
    self._dirty = False
    self._table_sharding = first.page_table[...].sharding
    self._owner_sharding = first.page_owner[...].sharding
    self._apply = jit_step(_apply_pages, check=False)  # it rejects nothing: no sync

  def pages_for(self, tokens: int) -> int:
    return page_plan.pages_for(tokens, self.tokens_per_page)

  def num_free(self) -> int:
    return int(np.sum(self.owner == page_plan.FREE))

  def reserve(self, slots, totals) -> None:
    """Give each slot pages for `totals` tokens in all (page_plan.allocate); raises
    ValueError with nothing changed if a slot is out of range, the pool is short or a
    total passes max_length."""
    slots = page_plan.as_slots(slots, self.num_slots, "EnginePages")
    # A page freed since the last push may be handed out again here: push still zeroes
    # it (freed mask) before the step that writes into it.
    taken = page_plan.allocate(self.owner, self.table, slots, totals,
                               tokens_per_page=self.tokens_per_page, max_length=self.max_length,
                               who="EnginePages")
    self._dirty = self._dirty or taken

  def release(self, slot) -> None:
    """Return the pages of `slot` (int or ints) to the pool; their lengths go to 0 and
    their pages are zeroed at the next push."""
    slots = page_plan.as_slots(slot, self.num_slots, "EnginePages")
    self._freed |= page_plan.release(self.owner, self.table, slots)
    self._released[slots] = True
    self._dirty = True

  def push(self, model, *, force: bool = False) -> None:
    """Write the changes since the last push to every layer's cache (one compiled call)."""
    if not (self._dirty or force):
      return
    # The devices get snapshots, never the live tables: the CPU runtime may place an aligned
    # NumPy array without copying it (its device buffer *is* the host memory; jax 0.10's
    # may_alias=False does not prevent that for NumPy input), and reserve / release write
    # these tables in place while the step that reads them may still be queued behind the
    # running one. Issue 17: a step then ran with tables from a later reserve / release
    # (StepRejected: pages not reserved). The masks are handed over and started afresh.
    table = jax.device_put(self.table.copy(), self._table_sharding)  # [S, M]
    owner = jax.device_put(self.owner.copy(), self._owner_sharding)  # [P]
    freed, self._freed = self._freed, np.zeros_like(self._freed)  # [P]
    released, self._released = self._released, np.zeros_like(self._released)  # [S]
    self._apply(model, table, owner, freed, released)
    self._dirty = False
