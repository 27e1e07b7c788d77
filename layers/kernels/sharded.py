"""Run a train-mode kernel under shard_map with specs from the logical rules.

Each shard computes attention for its slice of batch, query length and
heads: queries keep the spec of the mode's query axis names; keys/values
keep their batch and head sharding but are gathered over length (every query
may need every key: context parallelism by all-gather); positions, segment
ids, sinks, masks and biases follow the dimension they index.

GQA rule: if the kv heads are not split the same number of ways as the query
heads (e.g. 2 kv heads on tensor=4), K/V are repeated to one head per query
head before the kernel, so each shard holds the kv heads of its own query
heads; this costs K/V memory, so prefer num_kv_heads divisible by tensor.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meshattn.layers.kernels.api import TrainCall
from meshattn.sharding import logical_to_spec


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size


def sharded_kernel_call(kernel: Callable, mesh: jax.sharding.Mesh, rules, axes, query, key, value,
                        *, layout: str = "split", **kwargs):
  """kernel(query [B, T, N, H], key/value [B, S, K, H], **kwargs) under shard_map.

  `axes` is the mode's ActivationAxes. kwargs are the kernel's keyword
  arguments (options, positions, segment ids, sinks, mask, bias, ...).
  layout (registry.Kernel.length_layout):
    "split": kernels that mask by the positions they are given (dot_product,
      blockwise) split the query length and gather K/V (context parallelism);
    "whole": kernels whose masks use the token index inside the call (flash:
      cuDNN, tokamax, Pallas, splash) keep the whole query length on every
      shard, or a later shard's queries would be masked as if they started at 0;
    "ring" (kernels/ring.py): K/V, their positions and segment ids stay split
      over the length axes like the queries, and the kernel gets `axis_name`
      (those axes) to pass them around.
  """
  q_spec = logical_to_spec(axes.query, rules, mesh, query.shape)  # (batch, length, heads, None)
  kv_spec = logical_to_spec(axes.key, rules, mesh, key.shape)
  batch, length, heads = q_spec[0], q_spec[1] if layout != "whole" else None, q_spec[2]
  kv_heads = kv_spec[2] if len(kv_spec) > 2 else None
  if _axis_size(mesh, kv_heads) != _axis_size(mesh, heads) or kv_heads != heads and kv_heads is not None:
    group = query.shape[2] // key.shape[2]
    key = jnp.repeat(key, group, axis=2)  # [B, S, N, H]
    value = jnp.repeat(value, group, axis=2)  # [B, S, N, H]
  # The ring splits K/V like the queries; a key length the shards do not
  # divide (cross-attention) is gathered, and the ring is then one local step.
  ring = (layout == "ring" and length is not None
          and key.shape[1] % _axis_size(mesh, length) == 0)
  kv_length = length if ring else None
  q_spec = P(batch, length, heads, None)
  kv_spec = P(batch, kv_length, heads, None)
  if ring:
    kwargs = dict(kwargs, axis_name=length)

  # Each operand's dimensions say what they index (TrainCall.DIMS): the mesh axes of that
  # dimension of the query (K/V: whole, or split like the queries on the ring).
  mesh_axes = {"batch": batch, "heads": heads, "q_length": length, "kv_length": kv_length}

  def spec(name, x):
    return P(*(None if dim is None or x.shape[i] == 1 else mesh_axes[dim]
               for i, dim in enumerate(TrainCall.DIMS[name])))

  array_args = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array) and k in TrainCall.DIMS}
  static_args = {k: v for k, v in kwargs.items() if k not in array_args}
  in_specs = {k: spec(k, v) for k, v in array_args.items()}

  def per_shard(query, key, value, arrays):
    return kernel(query, key, value, **arrays, **static_args)

  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, in_specs),
                     out_specs=(q_spec, None), check_vma=False)
  return fn(query, key, value, array_args)


def sharded_decode_call(kernel: Callable, mesh: jax.sharding.Mesh, rules, axes, query, view, *,
                        shared_args: dict):
  """A decode kernel under shard_map: kernel(query [b, N, H], **view.arrays(), **shared_args)
  -> [b, N, H].

  Every spec comes from the cache's view (kvcache/views.py): a dimension the view names
  `batch_name` follows the queries' batch sharding, one named `heads_name` (of size > 1)
  their head sharding, every other one (page ids, tokens, head_dim) is replicated; so a
  page pool [P, tpp, K, H] is split over kv heads only and page_owner [P] is whole on
  every shard (a shard's rows may name any page, so every shard checks ownership against
  the whole pool). Heads are sharded only when the query and kv heads split the same way
  (else each shard holds all heads). shared_args are static keywords, but for `sinks` [N].
  """
  q_spec = logical_to_spec(axes.query, rules, mesh, (query.shape[0], 1) + query.shape[1:])
  arrays = {k: v for k, v in view.arrays().items() if v is not None}
  kv_heads = next(x.shape[names.index(view.heads_name)] for name, x in arrays.items()
                  for names in [view.logical_axes(name)] if view.heads_name in names)
  kv_heads_entry = logical_to_spec(axes.key, rules, mesh, (1, 1, kv_heads, query.shape[-1]))[2]
  batch = q_spec[0]
  heads = q_spec[2] if q_spec[2] == kv_heads_entry else None

  def spec(name: str, x: jax.Array) -> P:
    entries = []
    for dim, logical in enumerate(view.logical_axes(name)):
      if logical is not None and logical == view.batch_name:
        entries.append(batch)
      elif logical is not None and logical == view.heads_name and x.shape[dim] > 1:
        entries.append(heads)
      else:
        entries.append(None)
    return P(*entries)

  shared_args = dict(shared_args)
  sinks = shared_args.pop("sinks", None)
  names = list(arrays)

  def per_shard(query, sinks, *values):
    return kernel(query, sinks=sinks, **dict(zip(names, values)), **shared_args)

  in_specs = ((P(batch, heads, None), None if sinks is None else P(heads))
              + tuple(spec(k, arrays[k]) for k in names))
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P(batch, heads, None),
                     check_vma=False)
  return fn(query, sinks, *(arrays[k] for k in names))
