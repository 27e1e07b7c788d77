"""What every section of scripts/bench.py shares: the row, timing and error helpers."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
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
