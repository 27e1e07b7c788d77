"""Run a tiny problem on this process's GPU to learn whether a kernel works here.

Kernel availability is first asked while a layer's step is being traced: a probe
run there would only be recorded into that trace (its result is a tracer, so
nothing fails and "available" is cached although the kernel never ran). Probes
therefore run under `jax.ensure_compile_time_eval`, which executes them now.
They use this process's first GPU: `jax.devices("gpu")[0]` belongs to process 0
in a multi-host job, so a probe placed there fails on every other process, and
processes that decide differently trace different programs and hang in their
collectives.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax

T = TypeVar("T")


def local_gpu() -> jax.Device | None:
  """This process's first GPU, or None (no GPU backend, or JAX_PLATFORMS excludes it)."""
  try:
    devices = jax.local_devices(backend="gpu")
  except RuntimeError:
    return None
  return devices[0] if devices else None


def run_probe(probe: Callable[[jax.Device], T], device: jax.Device) -> T:
  """probe(device), executed now even when called while a computation is traced."""
  with jax.ensure_compile_time_eval():
    return probe(device)
