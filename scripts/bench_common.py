"""What every section of scripts/bench.py shares: the row, timing and error helpers."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclasses.dataclass
class Row:
  section: str
  kernel: str
  shape: str
  ms: float | None
  rate: float | None  # TFLOP/s or GB/s
  unit: str
  ratio: float | None = None  # vs the section's baseline
  status: str = "ok"
  max_err: float | None = None


def time_fn(fn: Callable, *args, iters: int, reps: int = 5) -> float:
  """Device time (ms) of one call: the median over `reps` of `iters` calls
  dispatched back to back and synchronised once, after a compile + warm-up.

  Syncing after every call would add the host round trip (~0.1 ms) to each
  sample, which is most of a 0.2 ms decode step; back to back, as a serving
  loop dispatches, the launches overlap and the mean per call is the kernel's.
  """
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):  # one device stream: the last result is ready after all the others
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / iters)
  return float(np.median(times))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def failed(error: Exception) -> str:
  """A row status for a kernel that raised (e.g. out of memory), one line."""
  return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def time_synced(fn: Callable, *args, iters: int) -> float:
  """Median ms of single calls each followed by a sync (includes the host round trip)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(3, iters // 4)):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times))


def copy_bandwidth(nbytes: int, *, iters: int, reps: int = 5) -> float:
  """GB/s of a device-to-device copy of nbytes (read + write counted as 2x)."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  ms = time_fn(jax.jit(lambda x: x * 1), x, iters=iters, reps=reps)
  return 2 * nbytes / (ms * 1e-3) / 1e9


def to_pages(k, v, tokens_per_page: int, seed: int = 0):
  """[B, S, K, H] caches -> pools [P, tpp, K, H] in random page order and tables [B, pages]."""
  b, s = k.shape[:2]
  per_seq = -(-s // tokens_per_page)
  num_pages = b * per_seq
  order = np.random.default_rng(seed).permutation(num_pages)
  table = jnp.asarray(order.reshape(b, per_seq).astype(np.int32))  # [B, pages]
  inverse = jnp.asarray(np.argsort(order).astype(np.int32))  # pool page -> logical page

  def pool(x):
    pad = per_seq * tokens_per_page - s
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    pages = x.reshape((num_pages, tokens_per_page) + x.shape[2:])  # logical page order
    return pages[inverse]  # pool order: pool page p holds logical page inverse[p]
  return pool(k), pool(v), table


def fmt(x, spec: str) -> str:
  """format(x, spec), or '-' for a value that was not measured."""
  return "-" if x is None else format(x, spec)
