"""Rejected steps: one mechanism for every mode (eager, jit, a mesh, several processes).

A prefill / decode step that the cache cannot serve (a slot out of range or
named twice, a sequence growing past max_length, tokens landing in pages that
were not reserved, left padding, a row packing several sequences, a
bidirectional layer continuing a slot) is
*rejected*: the cache stays exactly as it was and the caller gets a
`StepRejected` (a `ValueError`) naming what was wrong.

How the rejection reaches the caller depends on whether the checked values are
known on the host:

- eagerly they are concrete, and the step raises before anything is written;
- under `jit` they are traced. A raise from inside a sharded computation would
  fail on one device while the others wait in collectives (the process
  aborts), so the step never raises there. It folds its checks into an int32
  bit set (`Rejection`), gates every write on "no bit set" (so a rejected
  step leaves K/V, scales and lengths unchanged), and stores the bits in the
  cache's `rejected` variable. The host turns them into the exception after
  the step returns: `meshattn.layers.serving.jit_step` does that for every
  cache of the module (the documented serving pattern), and
  `raise_if_rejected(module)` does it for a step compiled some other way.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


class StepRejected(ValueError):
  """A prefill / decode step the KV cache cannot serve; the cache is unchanged."""


class Rejection(enum.IntFlag):
  """Why a step was rejected: bits of the int32 stored in a cache's `rejected`."""
  SLOT_OUT_OF_RANGE = 1
  DUPLICATE_SLOT = 2
  PAST_MAX_LENGTH = 4
  PAGES_NOT_RESERVED = 8
  LEFT_PADDING = 16
  BIDIRECTIONAL_NOT_EMPTY = 32
  PACKED_ROW = 64


def explain(bits: int, *, batch_size: int, max_length: int, kind: str = "KVCache",
            detail: dict[Rejection, str] | None = None) -> str:
  """The message for a set of rejection bits (the cache's limits named in it)."""
  detail = detail or {}
  reasons = {
      Rejection.SLOT_OUT_OF_RANGE:
          f"slot index out of range; slots must be in [0, {batch_size})",
      Rejection.DUPLICATE_SLOT: "slots must name each cache slot at most once per call",
      Rejection.PAST_MAX_LENGTH:
          f"a sequence would grow past max_length={max_length}; reset the slot or build the "
          "cache with a larger max_length",
      Rejection.PAGES_NOT_RESERVED:
          "tokens would land in pages that are not reserved; call reserve(slot, num_tokens) or "
          "reserve_for_step(slots, tokens_per_row) before the step",
      Rejection.LEFT_PADDING:
          "decoder_segment_ids must mark real tokens (nonzero) before padding (0) in every row "
          "(right padding only)",
      Rejection.BIDIRECTIONAL_NOT_EMPTY:
          "attention_type='full' (bidirectional) prefill must start on an empty slot (one "
          "prefill call per prompt)",
      Rejection.PACKED_ROW:
          "decoder_segment_ids must hold one sequence per row in prefill / decode (one nonzero "
          "id, then 0 padding): a row packing several sequences continues one cache slot, so "
          "they would see each other; give each sequence its own row and slot",
  }
  parts = []
  for flag, text in reasons.items():
    if bits & flag:
      extra = detail.get(flag)
      parts.append(f"{text} ({extra})" if extra else text)
  return f"{kind}: step rejected, cache unchanged: " + "; ".join(parts)


def is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def fold(conditions: dict[Rejection, jax.Array]) -> jax.Array:
  """Rejection bits (int32 scalar) of the conditions that hold anywhere in their arrays."""
  bits = jnp.zeros((), jnp.int32)
  for flag, condition in conditions.items():
    bits = bits | jnp.where(jnp.any(condition), jnp.int32(int(flag)), jnp.int32(0))
  return bits


def repeated_slots(rows) -> jax.Array | np.ndarray:
  """[b - 1] True where a slot of rows [b] is named again (compared sorted): a step or an
  insert may name each slot once. Host (NumPy) rows stay on the host."""
  xp = np if isinstance(rows, np.ndarray) else jnp
  ordered = xp.sort(xp.ravel(rows))
  return ordered[1:] == ordered[:-1]


def slot_ids(value, num_slots: int, *, name: str, who: str, distinct: bool = False):
  """The one check of a host-side slot argument (`reset`, `insert`, the page manager):
  `value` (a Python int, a NumPy / JAX integer array, or a list of ints) as a flat array
  of slot ids [n], NumPy int64 when concrete. Bools, floats, strings and other objects
  raise ValueError naming `name` (a float would otherwise be truncated onto another slot);
  a concrete id outside [0, num_slots), or (`distinct`) one named twice, raises
  StepRejected. Traced ids (an operation compiled into a step) are returned flat with only
  their dtype checked: their range is the step's gated check, and a write drops them."""
  if not is_concrete(value):
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{who}: {name} must be integers, got a traced {value.dtype} array")
    return jnp.ravel(value)
  try:
    ids = np.asarray(value)
  except (TypeError, ValueError) as e:  # a ragged list
    raise ValueError(f"{who}: {name} must be an int or a flat list / array of ints; {e}") from e
  ids = ids.reshape(-1)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):  # an empty list reads as float
    got = repr(value) if ids.size <= 4 else f"dtype {ids.dtype}"
    raise ValueError(f"{who}: {name} must be integers (a Python int, or a NumPy / JAX integer "
                     f"array; not bool, float or str), got {got}")
  bad = ids[(ids < 0) | (ids >= num_slots)]  # compared before the cast: a uint64 stays positive
  if bad.size:
    raise StepRejected(f"{who}: slot index out of range, nothing changed: {name} {bad.tolist()} "
                       f"out of range; slots must be in [0, {num_slots})")
  ids = ids.astype(np.int64)
  if distinct and np.any(repeated := repeated_slots(ids)):
    twice = sorted(set(np.sort(ids)[1:][repeated].tolist()))
    raise StepRejected(f"{who}: {name} {twice} named twice, nothing changed; an operation may "
                       "name each cache slot at most once per call")
  return ids


def raise_now(bits: jax.Array, message: Callable[[int], str]) -> None:
  """Eager: raise StepRejected(message(bits)) if any bit is set. Traced: do nothing here."""
  if is_concrete(bits):
    value = int(np.asarray(bits))
    if value:
      raise StepRejected(message(value))


@functools.cache
def host_callbacks_available() -> bool:
  """Host callbacks need a CPU device, absent when JAX_PLATFORMS excludes cpu."""
  try:
    return bool(jax.devices("cpu"))
  except RuntimeError:
    return False
