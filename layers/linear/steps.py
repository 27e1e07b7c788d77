"""A linear-attention layer's two paths: train / fresh prefill, and a step against its state cache.

Both run per shard under `shard_map` when the layer has a mesh: linear
attention is independent per sequence and per kv head, so batch and heads
keep the mode's sharding (heads only when the query and kv heads split the
same way, so each shard holds whole groups) and no collective is needed. The
sequence is not split: a shard holds whole sequences (a chunk's state depends
on every earlier chunk; context parallelism for linear layers is not built).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meshattn.layers.linear.chunkwise import LinearState, linear_attention
from meshattn.layers.linear.recurrent import linear_attention_step
from meshattn.layers.linear.spec import LinearSpec
from meshattn.sharding import logical_to_spec


def _batch_and_heads(mesh, rules, axes, query_shape, kv_shape):
  """Mesh entries (batch, heads) of the query [B, T, N, H] / key [B, T, K, H] names."""
  q_spec = logical_to_spec(axes.query, rules, mesh, query_shape)
  kv_spec = logical_to_spec(axes.key, rules, mesh, kv_shape)
  return q_spec[0], q_spec[2] if q_spec[2] == kv_spec[2] else None


def _sharded(fn, mesh, rules, axes, query, key, in_kinds, out_kinds):
  """fn under shard_map; kinds name each array's layout: 'heads' [B, T, heads, D],
  'tokens' [B, T], 'kv' / 'norm' states [B, K, ...], 'decay' [K]; None for an absent one."""
  if mesh is None:
    return fn
  batch, heads = _batch_and_heads(mesh, rules, axes, query.shape, key.shape)
  specs = {"heads": P(batch, None, heads, None), "tokens": P(batch, None),
           "kv": P(batch, heads, None, None), "norm": P(batch, heads, None), "decay": P(heads),
           None: None}
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs[k] for k in in_kinds),
                       out_specs=tuple(specs[k] for k in out_kinds), check_vma=False)


def linear_train(query, key, value, *, spec: LinearSpec, scale: float, segment_ids=None,
                 precision=None, mesh=None, rules=(), axes=None) -> jax.Array:
  """Causal linear attention over whole sequences: query [B, T, N, H], key / value
  [B, T, K, H], segment_ids [B, T] (packed rows; 0 = padding) -> context [B, T, N, H]."""
  def run(query, key, value, segment_ids, log_decay):
    context, _ = linear_attention(query, key, value, spec=spec, scale=scale,
                                  segment_ids=segment_ids, log_decay=log_decay,
                                  precision=precision)
    return (context,)

  log_decay = spec.log_decay(key.shape[2])  # [K]: a shard takes its heads' gammas
  kinds = ("heads", "heads", "heads", None if segment_ids is None else "tokens",
           None if log_decay is None else "decay")
  (context,) = _sharded(run, mesh, rules, axes, query, key, kinds, ("heads",))(
      query, key, value, segment_ids, log_decay)
  return context


def linear_cached_step(cache, rows: jax.Array, query: jax.Array, key: jax.Array,
                       value: jax.Array, *, valid: jax.Array, spec: LinearSpec, scale: float,
                       precision=None, mesh=None, rules=(), axes=None) -> jax.Array:
  """One prefill (T tokens) or decode (T = 1) step of slots rows [b] against a
  LinearStateCache: continue each slot from its state, then store the new one.

  query [b, T, N, H], key / value [b, T, K, H]; valid [b, T] the real tokens
  (a prefix of each row; all False if the step was rejected, then nothing is
  written). Returns the context [b, T, N, H] (zeros for padding). A prefill
  of any length runs the chunkwise form in one call: it already works chunk by
  chunk through the state, so `use_chunked_prefill` changes nothing here.
  """
  start = cache.lengths[...][jnp.clip(rows, 0, cache.batch_size - 1)]  # [b]
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  kv, norm = cache.read(rows)  # [b, K, H, V], [b, K, H]
  # An empty slot starts from zeros whatever its arrays hold.
  occupied = start > 0  # [b]
  kv = jnp.where(occupied[:, None, None, None], kv, 0.0)
  norm = jnp.where(occupied[:, None, None], norm, 0.0)
  decode = query.shape[1] == 1

  def run(query, key, value, valid, kv, norm, log_decay):
    state = LinearState(kv, norm)
    if decode:
      context, state = linear_attention_step(query[:, 0], key[:, 0], value[:, 0], state,
                                             spec=spec, scale=scale, valid=valid[:, 0],
                                             log_decay=log_decay, precision=precision)
      context = context[:, None]  # [b, 1, N, H]
    else:
      context, state = linear_attention(query, key, value, spec=spec, scale=scale, valid=valid,
                                        initial=state, log_decay=log_decay, precision=precision)
    return context, state.kv, state.norm

  log_decay = spec.log_decay(key.shape[2])  # [K]
  kinds = ("heads", "heads", "heads", "tokens", "kv", "norm",
           None if log_decay is None else "decay")
  context, kv, norm = _sharded(run, mesh, rules, axes, query, key, kinds,
                               ("heads", "kv", "norm"))(query, key, value, valid, kv, norm,
                                                        log_decay)
  cache.write(rows, kv, norm, jnp.any(valid, axis=1), new_lengths)
  return context


def check_linear_call(*, self_attention_length: bool, mask, bias, sow_weights: bool,
                      kv_segment_ids=None) -> None:
  """Raise ValueError for train-mode arguments a linear-attention layer cannot honour."""
  refused = {"mask": mask is not None, "bias": bias is not None, "sow_weights": sow_weights,
             "kv_segment_ids": kv_segment_ids is not None,
             "inputs_kv of another length (cross-attention)": not self_attention_length}
  bad = [name for name, on in refused.items() if on]
  if bad:
    raise ValueError(f"a linear-attention layer (attention_type='linear') does not take {bad}: "
                     "it is causal self-attention without attention weights")
