"""Request traces for the serving engine: arrival times, prompts and output lengths.

    trace = poisson_trace(prompts, rate=20.0, max_new_tokens=(4, 16), seed=0)
    results = engine.run(trace)

Arrivals are a Poisson process (exponential gaps of mean 1 / rate seconds),
the usual open-loop load of serving benchmarks (vLLM's benchmark_serving);
rate = inf sends every request at time 0. Output lengths are drawn
uniformly from an inclusive range (or fixed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from meshattn.layers.engine_schedule import Request


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
  """[n] arrival times (seconds, ascending, the first at 0) of a Poisson process of `rate`/s."""
  if n < 0 or not rate > 0:
    raise ValueError(f"poisson_arrivals: need n >= 0 and rate > 0 (requests per second), "
                     f"got n={n}, rate={rate}")
  if math.isinf(rate) or n == 0:
    return np.zeros((n,))
  gaps = rng.exponential(1.0 / rate, size=n)
  gaps[0] = 0.0
  return np.cumsum(gaps)


def poisson_trace(prompts: Sequence[np.ndarray], *, rate: float,
                  max_new_tokens: int | tuple[int, int], seed: int = 0,
                  first_id: int = 0) -> list[Request]:
  """One request per prompt (in order), arriving at `rate` per second; max_new_tokens is
  a fixed count or an inclusive (low, high) range drawn per request."""
  rng = np.random.default_rng(seed)
  arrivals = poisson_arrivals(len(prompts), rate, rng)
  low, high = (max_new_tokens, max_new_tokens) if isinstance(max_new_tokens, int) else max_new_tokens
  if not 1 <= low <= high:
    raise ValueError(f"poisson_trace: max_new_tokens must be >= 1 (a range low <= high), "
                     f"got {max_new_tokens}")
  lengths = rng.integers(low, high + 1, size=len(prompts))
  return [Request(first_id + i, np.asarray(p, np.int32), int(n), float(t))
          for i, (p, n, t) in enumerate(zip(prompts, lengths, arrivals))]
