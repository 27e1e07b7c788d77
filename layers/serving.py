"""The serving step: compiled once, caches updated in place, rejected steps raise.

    step = jit_step(lambda model, x, mode: model(x, model_mode=mode), static_argnames="mode")
    y = step(attn, prompts, "prefill")          # StepRejected (a ValueError) if refused

`jit_step(fn)` compiles fn(module, ...) once and adds what a serving loop needs:

- Rejections reach the caller. A step the cache cannot serve is rejected
  inside the computation without raising there (a raise on one device of a
  mesh leaves the others waiting in collectives and aborts the process): it
  writes nothing, keeps every length and records why in each cache's
  `rejected` bits (`kvcache.step_checks`). The wrapper returns those bits
  beside the output, reads them on the host (one replicated int32 scalar for
  the whole model, so every process reads the same value) and raises
  `StepRejected` naming the reason. The cache is unchanged and the process is
  ready for the next call. This works the same on one device, on a mesh and
  across processes.
- The module's caches (every variable but its parameters) are donated: XLA
  updates the cache buffers in place, so a decode step writes one token per
  row instead of copying the cache. Parameters are neither donated nor
  copied; cache arrays held outside the module are invalidated.
- Little Python per call: the module is split once (not on every call, as
  `nnx.jit` does), and each call hands its Variables' arrays to one
  `jax.jit`. On the H200 this is the difference between a 1.5 ms and a
  0.4 ms decode step for one Llama-3-8B layer (docs/benchmarks.md).

`raise_if_rejected(module)` does the host half for a step compiled some other
way (e.g. a plain `nnx.jit` on a multi-device mesh), or for `check=False` steps:
it reports every rejection since the last check and clears the bits.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.kvcache import graph_epoch, variable_arrays
from meshattn.kvcache.base import CacheBase
from meshattn.kvcache.graph_epoch import structure_changed  # noqa: F401  (re-exported)
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers.step_inputs import host_raises_after_step

_CACHES = (CacheBase,)  # every cache kind derives CacheBase


def caches_of(*trees) -> list:
  """Every KV cache inside the given modules (or pytrees holding modules), in graph order."""
  found = []
  for tree in trees:
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Module)):
      if isinstance(leaf, nnx.Module):
        found.extend(node for _, node in nnx.iter_graph(leaf) if isinstance(node, _CACHES))
  return found


def rejected_bits(caches) -> jax.Array:
  """OR of every cache's rejection bits: one replicated int32 scalar."""
  bits = jnp.zeros((), jnp.int32)
  for cache in caches:
    bits = bits | cache.rejected[...]
  return bits


def raise_if_rejected(*modules) -> None:
  """Raise StepRejected if any step of a cache in `modules` was rejected since the last
  check (host side). The caches' bits are cleared first, so each rejection is reported
  once and the next steps start clean."""
  messages = []
  for cache in caches_of(*modules):
    bits = int(np.asarray(cache.rejected[...]))
    if bits:
      messages.append(cache.explain(bits))
      cache.rejected[...] = jnp.zeros_like(cache.rejected[...])
  if messages:
    raise StepRejected(messages[0] if len(messages) == 1 else
                       f"{len(messages)} caches rejected the step: " + " | ".join(messages))


class _Binding:
  """A module split once: its graph definition and its live Variables in state order.

  Re-splitting a module on every call (what `nnx.jit` does) walks the whole
  graph in Python, about a millisecond for one layer on a GPU host, several
  times the device time of a decode step. A binding reads and writes the
  Variables' arrays directly instead. Parameters are passed apart from the
  rest (caches, RNG counters): only the rest is donated and returned, so a
  step neither copies nor invalidates the parameters.
  """

  def __init__(self, module):
    self.module = weakref.ref(module)  # an id can be reused once the module is gone
    self.graphdef, state = nnx.split(module)
    _, self.treedef = jax.tree.flatten(state)
    live = {path: node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)}
    self.paths = tuple(path for path, _ in nnx.to_flat_state(state))
    variables = [live[path] for path in self.paths]
    self.is_param = tuple(isinstance(v, nnx.Param) for v in variables)
    self.params = [v for v, p in zip(variables, self.is_param) if p]
    self.others = [v for v, p in zip(variables, self.is_param) if not p]
    self.ref_params = [variable_arrays.holds_ref(v) for v in self.params]
    self.ref_others = [variable_arrays.holds_ref(v) for v in self.others]
    self.epoch = graph_epoch.epoch()

  def same_graph(self, other: "_Binding") -> bool:
    """Whether `other`'s compiled step serves this split: the same graph (static attributes
    included) and the same Variables in the same places."""
    return (self.graphdef == other.graphdef and self.treedef == other.treedef
            and self.paths == other.paths and self.is_param == other.is_param)

  def arrays(self) -> tuple[list, list]:
    return _read(self.params, self.ref_params), _read(self.others, self.ref_others)

  def store(self, params, others) -> None:
    variable_arrays.can_update(self.params + self.others)  # one trace-level check for all
    _write(self.params, self.ref_params, params)
    _write(self.others, self.ref_others, others)


# The step moves raw values, as nnx.split / nnx.merge (and so nnx.jit) do: a Variable's
# get / set hooks run inside the step, where the module reads and writes it, not again
# here (kvcache.variable_arrays). Which Variables hold array refs is fixed at bind.
def _read(variables, refs) -> list:
  return [variable_arrays.read(v, ref) for v, ref in zip(variables, refs)]


def _write(variables, refs, arrays) -> None:
  for variable, ref, array in zip(variables, refs, arrays):
    if array is not None:  # None: a Variable the step left unchanged
      variable_arrays.replace(variable, array, ref, checked=True)


def _merge(is_param, params, others):
  """Interleave parameter and other leaves back into state order."""
  params, others = iter(params), iter(others)
  return [next(params) if p else next(others) for p in is_param]


def jit_step(fn: Callable | None = None, *, static_argnames=(), donate: bool = True,
             check: bool = True):
  """fn(module, *args, **kwargs) compiled once as a serving step (see module doc).

  The module (first argument) is split once and bound: each call passes its
  Variables' current arrays to one `jax.jit` (donated unless `donate=False`)
  and writes the new ones back, so host-side cache operations between steps
  (`reset`, `insert`, `reserve_for_step`) are seen by the next step. A new
  cache (`init_cache`), or any attribute assigned to a meshattn module, rebinds
  automatically, keeping the compiled step where the graph is unchanged
  (kvcache/graph_epoch.py); after changing another library's module call
  `structure_changed()`. Variables the step adds (sown values) are not returned. Raises `StepRejected` when any
  cache of the module rejected the step; the cache is then unchanged.

  Reading the rejection bits waits for the step to finish. A loop that syncs
  anyway a little later (to read its sampled tokens) can pass `check=False`
  and call `raise_if_rejected(module)` then: the step returns at once and the
  host can dispatch the next one while this one runs. The caches accumulate the
  bits of every step until that call, so a step rejected several steps earlier
  is still reported (the rejected step itself wrote nothing).
  """
  if fn is None:
    return functools.partial(jit_step, static_argnames=static_argnames, donate=donate,
                             check=check)
  static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
  signature = inspect.signature(fn)
  module_name = next(iter(signature.parameters))
  bindings: dict[int, _Binding] = {}

  def pure(graphdef, treedef, paths, is_param, params, others, dynamic, static):
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, _merge(is_param, params, others)))
    with host_raises_after_step():
      out = fn(module, **dynamic, **dict(static))
    # The bound Variables' new arrays, by path: a Variable the step added (a sown
    # intermediate) is not returned, and does not shift the others.
    current = dict(nnx.to_flat_state(nnx.state(module)))
    new = [jax.tree.leaves(current[path])[0] for path in paths]
    # Unchanged arrays are not returned (an output is a copy) unless donated, where the
    # output aliases the input buffer and returning it is what keeps the buffer alive.
    new_params = [None if n is o else n for n, o in zip((n for n, p in zip(new, is_param) if p), params)]
    new_others = [n if donate or n is not o else None
                  for n, o in zip((n for n, p in zip(new, is_param) if not p), others)]
    return out, new_params, new_others, rejected_bits(caches_of(module))

  def bind(module, previous: _Binding | None) -> _Binding:
    binding = _Binding(module)
    if previous is not None and binding.same_graph(previous):
      # The epoch moved for another module (or for a change that left this graph as it
      # was): keep the compiled step, with the Variables as they are now.
      binding.compiled = previous.compiled
      return binding
    # The graph is closed over, not a static argument: hashing it on every call would cost
    # more than the dispatch itself.
    binding.compiled = jax.jit(
        functools.partial(pure, binding.graphdef, binding.treedef, binding.paths,
                          binding.is_param),
        static_argnums=(3,), donate_argnums=(1,) if donate else ())
    return binding

  @functools.wraps(fn)
  def step(module, *args, **kwargs):
    binding = bindings.get(id(module))
    if binding is None or binding.module() is not module:
      binding = bindings[id(module)] = bind(module, None)
    elif binding.epoch != graph_epoch.epoch():
      binding = bindings[id(module)] = bind(module, binding)
    bound = signature.bind(module, *args, **kwargs)
    bound.apply_defaults()
    dynamic = dict(bound.arguments)
    del dynamic[module_name]
    static = tuple(sorted((name, dynamic.pop(name)) for name in static_argnames if name in dynamic))
    params, others = binding.arrays()
    out, params, others, bits = binding.compiled(params, others, dynamic, static)
    binding.store(params, others)
    if check and int(np.asarray(bits)):
      raise_if_rejected(module)
    return out

  return step
