"""Ring attention: context parallelism that never gathers K/V.

Under shard_map with the sequence split over `axis_name` (P shards, shard i
holding query block i and K/V block i), every shard attends its queries to
the K/V block it holds, then passes that block, with its positions and
segment ids, to the next shard (`lax.ppermute`, i -> i + 1); the pass is
issued before the block's attention and does not depend on it, so XLA can
overlap the two. After P - 1 passes every query has seen every key block
exactly once. Partial results are merged with the online-softmax rule
(running max m, sum l, unnormalised accumulator), so each shard keeps one
K/V block and one [T/P, S/P] logits tile instead of the whole K/V and a
[T/P, S] tile (the all-gather path, `sharded.py`).

Masks come from the global positions that travel with each block, so
causal, window, chunk and segment masks are exact across shards; a block a
query cannot see costs its compute (no load balancing: with a causal mask
the last shard does the most work).

Backward: reverse-mode autodiff of the scan. Each step is rematerialised
(`jax.checkpoint`), so the backward pass keeps the K/V block and float32
partial of every step (about the gathered K/V plus P partials [B, T/P, N,
H]) but no logits; the transpose of ppermute sends the K/V gradients back
around the ring.

Outside shard_map (axis_name None) it is one step over the local K/V.
Math and order of operations: those of dot_product.py (scale, soft cap,
mask, float32 softmax over [keys, sink]), except that the logits are always
float32 (dot_product keeps bf16 logits unless float32_qk_product /
float32_logits), so bf16 results differ from it by bf16 rounding. Not
supported: user masks and biases, score_mod / mask_mod, dropout, returned
weights (the registry routes those elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from meshattn.layers.kernels.api import KernelOptions, TrainCall, train_kernel
from meshattn.layers.kernels.registry import ALL, FLOAT32, train_variant
from meshattn.layers.kernels.train.dot_product import visible_mask
from meshattn.layers.kernels.shared.online_softmax import NEG, finish, hide, live_keys, live_queries


def _block(q5, k, v, q_pos, kv_pos, q_seg, kv_seg, options: KernelOptions):
  """Unnormalised attention of q5 [B, T, K, G, H] over one K/V block [B, S, K, H].

  Returns m, l [B, K, G, T] (float32 max / sum over the block's visible keys)
  and acc [B, T, K, G, H] (float32, probabilities times values).

  Rows of q, k, v that no pair of the block uses (padding, empty slots) are
  zeroed by a select before any product, and so is the block's acc of a query
  that sees nothing here (its cotangent), so a NaN / inf they hold reaches
  no visible output or gradient (online_softmax.py).
  """
  allowed = visible_mask(options, q_pos, kv_pos, q_seg, kv_seg, None)  # [B, 1, 1, T, S]
  live_q = live_queries(allowed)  # [B, T, 1, 1, 1]
  live_k = live_keys(allowed)  # [B, S, 1, 1]
  q5, k, v = hide(q5, live_q), hide(k, live_k), hide(v, live_k)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q5, k, precision=options.precision,
                      preferred_element_type=jnp.float32)  # [B, K, G, T, S]
  logits = logits * options.scale
  if options.soft_cap:
    logits = options.soft_cap * jnp.tanh(logits / options.soft_cap)
  logits = jnp.where(allowed, logits, NEG)
  m = logits.max(axis=-1)  # [B, K, G, T]
  p = jnp.where(allowed, jnp.exp(logits - m[..., None]), 0.0)  # [B, K, G, T, S]
  acc = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, precision=options.precision,
                   preferred_element_type=jnp.float32)  # [B, T, K, G, H]
  return m, p.sum(axis=-1), hide(acc, live_q)


def _merge(a, b):
  """Two online-softmax partials (m, l [B, K, G, T], acc [B, T, K, G, H]) -> one."""
  (m1, l1, acc1), (m2, l2, acc2) = a, b
  m = jnp.maximum(m1, m2)
  w1, w2 = jnp.exp(m1 - m), jnp.exp(m2 - m)  # [B, K, G, T]
  to_acc = lambda w: jnp.moveaxis(w, 3, 1)[..., None]  # [B, T, K, G, 1]
  return m, l1 * w1 + l2 * w2, acc1 * to_acc(w1) + acc2 * to_acc(w2)


def _ring_size(axis_name) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


# What the ring passes around: no user mask / bias, hooks, dropout or weights (the kernel
# refuses those itself, naming them).
RING_FEATURES = frozenset({"gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap",
                           "sinks", "backward"})


@train_variant("ring", ALL, RING_FEATURES | FLOAT32, "ring over the sequence shards (ppermute)",
               ring=True)
@train_kernel("ring_attention")
def ring_attention(query: jax.Array, key: jax.Array, value: jax.Array, call: TrainCall, *,
                   axis_name: str | tuple[str, ...] | None = None) -> tuple[jax.Array, None]:
  """Attention of this shard's query [B, T, N, H] over the whole ring's key/value, of which
  this shard holds [B, S, K, H] (positions and segment ids likewise: the block's own).

  axis_name: the mesh axis (or axes) the sequence is split over; None = no
  ring. Returns (context [B, T, N, H], None).
  """
  unsupported = {"mask": call.mask is not None, "bias": call.bias is not None,
                 "score_mod": call.options.score_mod is not None,
                 "mask_mod": call.options.mask_mod is not None, "return_weights": call.return_weights,
                 "dropout": call.options.dropout_rate > 0 and not call.deterministic}
  bad = [name for name, on in unsupported.items() if on]
  if bad:
    raise NotImplementedError(f"ring attention does not support {bad} (use blockwise or "
                              "dot_product)")
  batch, q_len, num_heads, head_dim = query.shape
  kv_heads = key.shape[2]
  group = num_heads // kv_heads
  q5 = query.reshape(batch, q_len, kv_heads, group, head_dim)  # [B, T, K, G, H]
  # What travels around the ring: the block and the positions / ids that mask it.
  block = (key, value, call.kv_positions) + (() if call.q_segment_ids is None else (call.kv_segment_ids,))

  def attend(kv_block):
    k, v, kv_pos, *kv_seg = kv_block
    return _block(q5, k, v, call.q_positions, kv_pos, call.q_segment_ids, kv_seg[0] if kv_seg else None,
                  call.options)

  attend = jax.checkpoint(attend)  # the backward recomputes each step's logits
  size = _ring_size(axis_name)
  if size > 1:
    perm = [(i, (i + 1) % size) for i in range(size)]

    def step(carry, _):
      partial, kv_block = carry
      # Sent before, and independent of, this block's attention: the two can overlap.
      received = jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), kv_block)
      return (_merge(partial, attend(kv_block)), received), None

    nothing = (jnp.full((batch, kv_heads, group, q_len), NEG, jnp.float32),
               jnp.zeros((batch, kv_heads, group, q_len), jnp.float32),
               jnp.zeros((batch, q_len, kv_heads, group, value.shape[-1]), jnp.float32))
    (partial, block), _ = lax.scan(step, (nothing, block), None, length=size - 1)
    # Steps 0 .. P-2 attended the blocks they passed on; the last block arrives at the end.
    m, l, acc = _merge(partial, attend(block))
  else:
    m, l, acc = attend(block)
  if call.sinks is not None:  # one more partial: probability mass, no value
    sink = call.sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1)  # [1, K, G, 1]
    sink = jnp.broadcast_to(sink, m.shape)  # [B, K, G, T]
    m, l, acc = _merge((m, l, acc), (sink, jnp.ones_like(l), jnp.zeros_like(acc)))
  l = jnp.moveaxis(l, 3, 1)[..., None]  # [B, T, K, G, 1]
  context = finish(l, acc)  # [B, T, K, G, H]
  return context.reshape(batch, q_len, num_heads, value.shape[-1]).astype(query.dtype), None
