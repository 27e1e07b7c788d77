"""The engine's page tables: allocated once on the host, written to every layer in one call.

Each layer of the model has its own PagedKVCache with its own page pool, and
every layer makes the same choices (the same slots reserve and free the same
amounts in the same order). `PagedKVCache.reserve_for_step` / `free` manage
one cache: each call reads that cache's tables back from the devices and
runs a few eager ops (a scatter per freed pool, compiled anew for every new
page count), so a model of L layers pays ~10 L small dispatches and syncs
per arriving or finishing request. Measured on CPU (tiny-lm, 8 devices):
`free` was half of the serving loop's time.

`EnginePages` keeps the tables once, on the host, with the cache's own
policy (pages of a slot in logical order, lowest free id first), and
`push` writes the changes to every layer in one compiled call of fixed
shapes: page table [S, M] and owner [P] replaced, released slots' lengths
set to 0, freed pages' K/V zeroed (scales reset to 1) as `free` does, so a
reused page never holds its previous owner's data. The device tables stay
the truth that the step checks (`PAGES_NOT_RESERVED`), and they stay
readable by the cache's own API (`num_free_pages`, `pages_of`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.layers.serving import caches_of, jit_step


def _apply_pages(model, table, owner, freed, released):
  """Every paged cache of `model`: tables <- table [S, M], owner [P]; pages with `freed`
  [P] zeroed (scales 1); slots with `released` [S] emptied (length 0)."""
  for cache in caches_of(model):
    cache.page_table[...] = table  # [S, M]
    cache.page_owner[...] = owner  # [P]
    page = freed[:, None, None, None]  # [P, 1, 1, 1]
    cache.key_pages[...] = jnp.where(page, jnp.zeros((), cache.key_pages.dtype),
                                     cache.key_pages[...])  # [P, tpp, K, H]
    cache.value_pages[...] = jnp.where(page, jnp.zeros((), cache.value_pages.dtype),
                                       cache.value_pages[...])  # [P, tpp, K, H]
    if cache.quant:
      for scale in (cache.key_scale, cache.value_scale):
        scale[...] = jnp.where(freed[:, None, None], 1.0, scale[...])  # [P, tpp, K or 1]
    cache.lengths[...] = jnp.where(released, 0, cache.lengths[...])  # [S]


class EnginePages:
  """Host page tables for the caches of one model (see module doc)."""

  def __init__(self, caches):
    first = caches[0]
    self.num_slots, self.num_pages = first.batch_size, first.num_pages
    self.tokens_per_page, self.max_length = first.tokens_per_page, first.max_length
    self.max_pages_per_sequence = first.max_pages_per_sequence
    for cache in caches:
      if (np.asarray(cache.page_owner[...]) != -1).any() or (np.asarray(cache.lengths[...]) > 0).any():
        raise ValueError("EnginePages needs empty caches (a fresh init_cache)")
    self.owner = np.full((self.num_pages,), -1, np.int32)  # [P] slot owning each page
    self.table = np.full((self.num_slots, self.max_pages_per_sequence), -1, np.int32)  # [S, M]
    self._freed = np.zeros((self.num_pages,), bool)  # [P] since the last push
    self._released = np.zeros((self.num_slots,), bool)  # [S] since the last push
    self._dirty = False
    self._table_sharding = first.page_table[...].sharding
    self._owner_sharding = first.page_owner[...].sharding
    self._apply = jit_step(_apply_pages, check=False)  # it rejects nothing: no sync

  def pages_for(self, tokens: int) -> int:
    return math.ceil(tokens / self.tokens_per_page)

  def num_free(self) -> int:
    return int(np.sum(self.owner == -1))

  def reserve(self, slots, totals) -> None:
    """Give each slot pages for `totals` tokens in all (lowest free ids first); raises
    ValueError with nothing changed if the pool is short or a total passes max_length."""
    slots, totals = np.asarray(slots, np.int64).reshape(-1), np.asarray(totals, np.int64).reshape(-1)
    if (totals > self.max_length).any() or (totals < 0).any():
      raise ValueError(f"EnginePages: cannot reserve {totals.tolist()} tokens; a sequence holds 0 "
                       f"to max_length={self.max_length}")
    wanted = [(int(slot), col) for slot, total in zip(slots, totals)
              for col in range(self.pages_for(int(total))) if self.table[slot, col] < 0]
    free_ids = np.flatnonzero(self.owner == -1)
    if len(wanted) > len(free_ids):
      raise ValueError(f"EnginePages: slots {slots.tolist()} need {len(wanted)} more pages, "
                       f"{len(free_ids)} of num_pages={self.num_pages} are free")
    for (slot, col), page in zip(wanted, free_ids):
      self.owner[page] = slot
      self.table[slot, col] = page  # a page freed since the last push is still zeroed first
    self._dirty = self._dirty or bool(wanted)

  def release(self, slot: int) -> None:
    """Return `slot`'s pages to the pool; its length goes to 0 and its pages are zeroed at
    the next push."""
    pages = self.owner == slot
    self.owner[pages] = -1
    self.table[slot] = -1
    self._freed |= pages
    self._released[slot] = True
    self._dirty = True

  def push(self, model, *, force: bool = False) -> None:
    """Write the changes since the last push to every layer's cache (one compiled call)."""
    if not (self._dirty or force):
      return
    table = jax.device_put(self.table, self._table_sharding)
    owner = jax.device_put(self.owner, self._owner_sharding)
    self._apply(model, table, owner, self._freed.copy(), self._released.copy())
    self._freed[:] = False
    self._released[:] = False
    self._dirty = False
