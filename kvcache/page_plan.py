"""The page-allocation policy of a paged KV cache, on host tables (NumPy arrays, no JAX ops).

One policy, used by `PagedKVCache` (kvcache/paged.py: one cache's tables, read back
from its devices) and by the serving engine's `EnginePages` (layers/engine_pages.py:
one host copy of the tables that every layer shares):

  owner  [P] int32     slot owning each page (-1 = free)
  table  [S, M] int32  page holding logical entries [i*tpp, (i+1)*tpp) of a slot
                       (-1 = none); M = ceil(max_length / tpp)

`allocate` gives slots the pages they lack, in each slot's logical order, slots in
increasing id, lowest free page id first; all slots get theirs or none does (the
tables are untouched when it raises). It never shrinks a slot, so reserving the same
total again changes nothing. `release` returns slots' pages to the pool and says
which pages it freed; the device side (`PagedKVCache.clear_freed`) then zeroes
those pages and empties the slots, so a reused page never shows its previous owner.
"""

from __future__ import annotations

import numpy as np

from meshattn.kvcache.step_checks import slot_ids

FREE = -1  # owner / table entry of no page or no slot


def as_slots(slot, num_slots: int, who: str, name: str = "slot") -> np.ndarray:
  """`slot` (an int or ints) as a flat int64 array, by the caches' one slot check
  (step_checks.slot_ids): integers in [0, num_slots), else ValueError naming `name`."""
  return slot_ids(slot, num_slots, name=name, who=who)


def pages_for(tokens: int, tokens_per_page: int) -> int:
  """Pages that hold `tokens` tokens (ceil)."""
  return -(-int(tokens) // tokens_per_page)


def allocate(owner: np.ndarray, table: np.ndarray, slots: np.ndarray, totals, *,
             tokens_per_page: int, max_length: int, who: str) -> bool:
  """Give each of `slots` [n] pages for `totals` (int or [n]) tokens in all, in place.

  A slot named twice gets the larger total. Returns whether any page was taken.
  Raises ValueError, with owner / table unchanged, if a total is outside
  [0, max_length] or the pool has too few free pages for all slots together.
  """
  totals = np.broadcast_to(np.asarray(totals, np.int64).reshape(-1), slots.shape)
  bad = totals[(totals < 0) | (totals > max_length)]
  if bad.size:
    raise ValueError(f"{who}: cannot reserve {bad.tolist()} tokens; a sequence holds 0 to "
                     f"max_length={max_length} tokens")
  need: dict[int, int] = {}  # slot -> pages it must hold
  for slot, total in zip(slots.tolist(), totals.tolist()):
    need[slot] = max(need.get(slot, 0), pages_for(total, tokens_per_page))
  wanted = [(slot, column) for slot, pages in sorted(need.items()) for column in range(pages)
            if table[slot, column] == FREE]  # (slot, logical page) pairs still without a page
  free_ids = np.flatnonzero(owner == FREE)  # ascending: lowest id first
  if len(wanted) > len(free_ids):
    raise ValueError(f"{who} out of pages: slots {sorted(need)} need {len(wanted)} more "
                     f"page(s) of {tokens_per_page} tokens but only {len(free_ids)} of "
                     f"num_pages={owner.shape[0]} are free; free finished sequences or build "
                     "the cache with more pages")
  for (slot, column), page in zip(wanted, free_ids):
    owner[page] = slot
    table[slot, column] = page
  return bool(wanted)


def release(owner: np.ndarray, table: np.ndarray, slots: np.ndarray) -> np.ndarray:
  """Return the pages of `slots` [n] to the pool, in place: their owner entries and the
  slots' table rows become FREE. Returns the freed pages as a mask [P] bool."""
  freed = np.isin(owner, slots)  # [P]
  owner[freed] = FREE
  table[slots] = FREE
  return freed


def released_mask(slots: np.ndarray, num_slots: int) -> np.ndarray:
  """`slots` [n] as a mask [S] bool (the slots whose length goes to 0)."""
  mask = np.zeros((num_slots,), bool)
  mask[slots] = True
  return mask
