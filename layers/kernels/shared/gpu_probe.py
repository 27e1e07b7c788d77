"""Run a tiny problem on this process's GPU to learn whether a kernel works here.

Kernel availability is first asked while a layer's step is being traced: a probe
run there would only be recorded into that trace (its result is a tracer, so
nothing fails and "available" is cached although the kernel never ran). Probes
therefore run in a thread of their own, outside the caller's trace.
They use this process's first GPU: `jax.devices("gpu")[0]` belongs to process 0
in a multi-host job, so a probe placed there fails on every other process, and
processes that decide differently trace different programs and hang in their
collectives.

`gpu_probe_passes` is what an availability check calls: the GPU lookup, the
concrete run and the "any failure means not usable here" rule live there once.
Callers cache its answer per process (`functools.cache`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import re
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")

logger = logging.getLogger("meshattn.kernels")


def local_gpu() -> jax.Device | None:
  """This process's first GPU, or None (no GPU backend, or JAX_PLATFORMS excludes it)."""
  try:
    devices = jax.local_devices(backend="gpu")
  except RuntimeError:
    return None
  return devices[0] if devices else None


def run_probe(probe: Callable[[jax.Device], T], device: jax.Device) -> T:
  """probe(device), executed now even when called while a computation is traced.

  It runs in a thread of its own: JAX's trace state is per thread, so there the
  probe's jitted call compiles and runs as at top level. (Under
  `jax.ensure_compile_time_eval` jax 0.11 evaluates a jitted call op by op, which a
  Mosaic GPU kernel with named axes cannot do: tokamax's probe failed there with
  "unbound axis name: q_tiles" and flash lost its fastest GPU kernel, H200, 2026-12-04.)
  The thread does not inherit the caller's JAX context managers (x64, default matmul
  precision, a mesh): probes pin their dtypes and devices and ask only "does it run here".
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    return pool.submit(probe, device).result()


def causal_attention_runs(attend: Callable[..., jax.Array]) -> Callable[[jax.Device], bool]:
  """A probe: attend(q, k, v, is_causal=True) on a tiny bfloat16 problem compiles and runs."""

  def probe(device: jax.Device) -> bool:
    x = jax.device_put(jnp.zeros((1, 128, 1, 64), jnp.bfloat16), device)  # [B, T, N, H]
    jax.block_until_ready(jax.jit(functools.partial(attend, is_causal=True))(x, x, x))
    return True

  return probe


def _capability(device: jax.Device) -> float:
  """The device's compute capability as a number ("9.0" -> 9.0, "12.0a" -> 12.0; 0 unknown)."""
  match = re.match(r"\d+(\.\d+)?", str(getattr(device, "compute_capability", "")))
  return float(match.group()) if match else 0.0


def gpu_probe_passes(probe: Callable[[jax.Device], bool], *, min_capability: float = 0.0,
                     warning: str | None = None) -> bool:
  """Whether probe(device) returns True on this process's first GPU (run now, even in a trace).

  False without a local GPU, on one whose compute capability is below
  `min_capability`, when the probe returns False, or when it raises: any
  failure means "not usable here". `warning`, a logging format with two `%s`
  (the error's type and its message), is logged when the probe raises.
  """
  device = local_gpu()
  if device is None:
    return False
  if min_capability and _capability(device) < min_capability:
    return False
  try:
    return bool(run_probe(probe, device))
  except Exception as error:  # pylint: disable=broad-except  # any failure: "not usable here"
    if warning is not None:
      logger.warning(warning, type(error).__name__, str(error)[:300])
    return False
