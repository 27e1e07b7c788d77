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

  def pairwise_spec(x):  # mask / bias [B|1, N|1, T|1, S|1]
    return P(batch if x.shape[0] > 1 else None, heads if x.shape[1] > 1 else None,
             length if x.shape[2] > 1 else None, None)

  spec_of = {
      "q_positions": P(batch, length), "kv_positions": P(batch, kv_length),
      "q_segment_ids": P(batch, length), "kv_segment_ids": P(batch, kv_length),
      "sinks": P(heads),
  }
  array_args = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array) and k != "dropout_rng"}
  static_args = {k: v for k, v in kwargs.items() if k not in array_args}
  in_specs = {k: pairwise_spec(v) if k in ("mask", "bias") else spec_of[k]
              for k, v in array_args.items()}

  def per_shard(query, key, value, arrays):
    return kernel(query, key, value, **arrays, **static_args)

  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, in_specs),
                     out_specs=(q_spec, None), check_vma=False)
  return fn(query, key, value, array_args)


def sharded_decode_call(kernel: Callable, mesh: jax.sharding.Mesh, rules, axes, query, *,
                        batch_args: dict, pool_args: dict, shared_args: dict):
  """A decode kernel under shard_map: kernel(query [b, N, H], **args) -> [b, N, H].

  batch_args have the batch first ([b, ...], e.g. caches [b, C, K, H],
  lengths, page tables, the rows' cache slots), kv heads third in 4-D ones
  and second in the 3-D scales [b, K or 1, C]; pool_args are shared by every
  row: page pools [P, tpp, K, H] and their scales (sharded over kv heads
  only) and page_owner [P] (replicated: a shard's rows may name any page,
  so every shard checks ownership against the whole pool);
  shared_args are static keyword arguments. Heads are sharded only when the
  query and kv heads split the same way (else each shard holds all heads).
  """
  q_spec = logical_to_spec(axes.query, rules, mesh, (query.shape[0], 1) + query.shape[1:])
  kv_shape = batch_args["key"].shape if "key" in batch_args else pool_args["key_pages"].shape
  kv_heads = kv_shape[2]  # caches [b, C, K, H] and pools [P, tpp, K, H] both have K third
  kv_heads_entry = logical_to_spec(axes.key, rules, mesh, (1, 1, kv_heads, query.shape[-1]))[2]
  batch = q_spec[0]
  heads = q_spec[2] if q_spec[2] == kv_heads_entry else None

  def spec(x, batched):
    if x is None:
      return None
    if not batched:
      if x.ndim < 3:  # page_owner [P]
        return P(*([None] * x.ndim))
      # page pools and scales [P, tpp, K or 1, ...]
      return P(None, None, heads if x.shape[2] > 1 else None, *([None] * (x.ndim - 3)))
    entries = [batch] + [None] * (x.ndim - 1)
    head_axis = 1 if x.ndim == 3 else 2  # [b, K, C] scales, [b, C, K, H] caches
    if x.ndim >= 3 and x.shape[head_axis] > 1:
      entries[head_axis] = heads
    return P(*entries)

  def sinks_spec(x):
    return None if x is None else P(heads)

  arrays = {**{k: (v, spec(v, True)) for k, v in batch_args.items()},
            **{k: (v, spec(v, False)) for k, v in pool_args.items()}}
  sinks = shared_args.pop("sinks", None)
  names = [k for k, (v, _) in arrays.items() if v is not None]

  def per_shard(query, sinks, *values):
    return kernel(query, sinks=sinks, **dict(zip(names, values)), **shared_args)

  in_specs = (P(batch, heads, None), sinks_spec(sinks)) + tuple(arrays[k][1] for k in names)
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P(batch, heads, None),
                     check_vma=False)
  return fn(query, sinks, *(arrays[k][0] for k in names))
