"""The serving step: compiled once, caches updated in place, rejected steps raise.

    step = jit_step(lambda model, x, mode: model(x, model_mode=mode), static_argnames="mode")
    y = step(attn, prompts, "prefill")          # StepRejected (a ValueError) if refused

`jit_step(fn)` is `nnx.jit(fn)` plus two things a serving loop needs:

- Rejections reach the caller. A step the cache cannot serve is rejected
  inside the computation without raising there (a raise on one device of a
  mesh leaves the others waiting in collectives and aborts the process): it
  writes nothing, keeps every length and records why in each cache's
  `rejected` bits (`kvcache.step_checks`). The wrapper returns those bits
  beside the output, reads them on the host (one replicated int32 scalar for
  the whole model, so every process reads the same value) and raises
  `StepRejected` naming the reason. The cache is unchanged and the process is
  ready for the next call. This works the same eagerly, on one device, on a
  mesh and across processes.
- The module is donated (`donate_argnums=0` by default): XLA then updates the
  cache buffers in place, so a decode step writes one token per row instead
  of copying the cache. Parameters come back aliased to the same buffers;
  only arrays held outside the module and shared with it are invalidated.

`raise_if_rejected(module)` does the host half for a step compiled some other
way (e.g. a plain `nnx.jit` on a multi-device mesh).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers.step_inputs import host_raises_after_step

_CACHES = (KVCache, PagedKVCache)


def caches_of(*trees) -> list:
  """Every KV cache inside the given modules (or pytrees holding modules), in graph order."""
  found = []
  for tree in trees:
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Module)):
      if isinstance(leaf, nnx.Module):
        found.extend(node for _, node in nnx.iter_graph(leaf) if isinstance(node, _CACHES))
  return found


def _rejected_bits(caches) -> jax.Array:
  """OR of every cache's rejection bits: one replicated int32 scalar."""
  bits = jnp.zeros((), jnp.int32)
  for cache in caches:
    bits = bits | cache.rejected[...]
  return bits


def raise_if_rejected(*modules) -> None:
  """Raise StepRejected if the last step of any cache in `modules` was rejected (host side)."""
  messages = []
  for cache in caches_of(*modules):
    bits = int(np.asarray(cache.rejected[...]))
    if bits:
      messages.append(cache.explain(bits))
  if messages:
    raise StepRejected(messages[0] if len(messages) == 1 else
                       f"{len(messages)} caches rejected the step: " + " | ".join(messages))


def jit_step(fn: Callable | None = None, *, donate_argnums=0, **jit_kwargs):
  """`nnx.jit(fn)` for serving steps: donated module, rejected steps raise (see module doc).

  fn(module, *args, **kwargs) -> outputs; jit_kwargs go to `nnx.jit`
  (static_argnames, in/out shardings, ...). Pass `donate_argnums=()` to keep
  the input buffers alive.
  """
  if fn is None:
    return functools.partial(jit_step, donate_argnums=donate_argnums, **jit_kwargs)

  @functools.wraps(fn)  # nnx.jit reads static_argnames from fn's signature
  def traced(*args, **kwargs):
    with host_raises_after_step():
      out = fn(*args, **kwargs)
    return out, _rejected_bits(caches_of(*args))

  compiled = nnx.jit(traced, donate_argnums=donate_argnums, **jit_kwargs)

  @functools.wraps(fn)
  def step(*args, **kwargs):
    out, bits = compiled(*args, **kwargs)
    if int(np.asarray(bits)):
      raise_if_rejected(*args)
    return out

  return step
