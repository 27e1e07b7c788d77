"""Causal linear attention, chunkwise-parallel: train and prefill in O(T) memory.

The sequence is cut into chunks of `spec.chunk_size` tokens. Inside a chunk
the output is the masked quadratic form (phi(q) phi(k)^T times the decay
mask); between chunks it goes through the running state
S = sum_s gamma^(t-s) phi(k_s) v_s^T [B, K, Hk, Hv] (and the normalizer
z = sum_s gamma^(t-s) phi(k_s) [B, K, Hk]). Every chunk's own contribution
to the state is computed in parallel; one `lax.scan` over the chunks then
carries the state (elementwise work only), and every chunk reads the state it
starts from in parallel again. Memory: the [C, C] scores of every chunk and
one state per chunk, O(T * (C + H^2 / C)).

Which tokens see which:
  * `valid` [B, T] (default all): invisible tokens (padding, segment 0, the
    chunk padding past T) contribute nothing, output zeros and are
    transparent: decay counts only visible tokens, so a row's state after
    right padding is its state after its last real token.
  * `segment_ids` [B, T] (packed rows): the state resets where the segment
    changes, so each packed sequence attends only to itself.
  * `initial` (prefill continuing a cache slot): the state as of the slot's
    last token; the step's first visible token is one step after it.
Invisible values are selected away (`where`), never multiplied by zero, so a
NaN in padding reaches neither the outputs nor the gradients.

GQA / MQA: queries are grouped [.., K, G, H] against their kv head; K/V are
never repeated. Einsum letters: B batch, c chunk, i / j token in a chunk,
K kv heads, G group, H key (feature) dim, V value dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from meshattn.layers.linear.spec import LinearSpec, decay_powers


class LinearState(NamedTuple):
  """The recurrent state of causal linear attention, as of a sequence's last token."""

  kv: jax.Array  # [B, K, Hk, Hv] float32: sum gamma^(t-s) phi(k_s) v_s^T
  norm: jax.Array  # [B, K, Hk] float32: sum gamma^(t-s) phi(k_s)

  @classmethod
  def zeros(cls, batch: int, num_kv_heads: int, key_dim: int, value_dim: int) -> "LinearState":
    return cls(jnp.zeros((batch, num_kv_heads, key_dim, value_dim), jnp.float32),
               jnp.zeros((batch, num_kv_heads, key_dim), jnp.float32))


def token_runs(valid: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(run [B, T], index [B, T]) of tokens that are `valid` [B, T].

  run: 0 for the first visible token, +1 at every visible token whose segment
  differs from the previous visible one's (a state reset). index: how many
  visible tokens come before (the decay distance counts these).
  """
  index = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, T]
  if segment_ids is None:
    return jnp.zeros_like(index), index
  t = jnp.arange(valid.shape[1], dtype=jnp.int32)[None, :]  # [1, T]
  latest = jax.lax.cummax(jnp.where(valid, t, -1), axis=1)  # [B, T] last visible at or before t
  before = jnp.pad(latest[:, :-1], ((0, 0), (1, 0)), constant_values=-1)  # [B, T] strictly before
  previous_segment = jnp.take_along_axis(segment_ids, jnp.maximum(before, 0), axis=1)  # [B, T]
  starts = valid & (before >= 0) & (segment_ids != previous_segment)  # [B, T]
  return jnp.cumsum(starts, axis=1, dtype=jnp.int32), index


def _to_chunks(x: jax.Array, chunk: int, pad_value=0) -> jax.Array:
  """[B, T, ...] -> [B, T / C, C, ...], padding T up to a multiple of C."""
  t = x.shape[1]
  padded = -(-t // chunk) * chunk
  if padded != t:
    x = jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
  return x.reshape((x.shape[0], padded // chunk, chunk) + x.shape[2:])


def linear_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, spec: LinearSpec,
                     scale: float = 1.0, valid: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, initial: LinearState | None = None,
                     log_decay: jax.Array | None = None,
                     precision=None) -> tuple[jax.Array, LinearState]:
  """query [B, T, N, H], key [B, T, K, H], value [B, T, K, V] -> (context [B, T, N, V], state).

  scale multiplies phi(q) (it cancels under the normalizer). The returned
  state is each row's state after its last visible token (`initial` for a
  row without one), ready for the recurrent decode step. log_decay [K]: log gamma of
  these kv heads (default from the spec; a shard holding some kv heads passes its own).
  """
  b, t, n, h = query.shape
  kv_heads, v_dim = key.shape[2], value.shape[-1]
  if n % kv_heads or key.shape[:2] != (b, t) or value.shape[:3] != key.shape[:3]:
    raise ValueError(f"linear attention takes query [B, T, N, H], key [B, T, K, H], value "
                     f"[B, T, K, V] with K dividing N; got {query.shape}, {key.shape}, "
                     f"{value.shape}")
  group = n // kv_heads
  chunk = min(spec.chunk_size, t)
  valid = jnp.ones((b, t), bool) if valid is None else valid
  if segment_ids is not None:
    valid = valid & (segment_ids != 0)
  run, index = token_runs(valid, segment_ids)  # [B, T]
  if log_decay is None:
    log_decay = spec.log_decay(kv_heads)  # [K] or None
  if initial is None:
    initial = LinearState.zeros(b, kv_heads, h, v_dim)

  visible = valid[:, :, None, None]  # [B, T, 1, 1]
  # Invisible tokens (they may hold NaN) are selected away before the feature map, whose
  # derivative at NaN would poison the gradient, and after it (phi(0) need not be 0).
  hide = lambda x: jnp.where(visible, x, jnp.zeros((), x.dtype))
  q = hide(spec.features(hide(query)) * scale)  # [B, T, N, H] float32
  k = hide(spec.features(hide(key)))  # [B, T, K, H] float32
  v = hide(value.astype(jnp.float32))  # [B, T, K, V]
  q = _to_chunks(q.reshape(b, t, kv_heads, group, h), chunk)  # [B, c, C, K, G, H]
  k = _to_chunks(k, chunk)  # [B, c, C, K, H]
  v = _to_chunks(v, chunk)  # [B, c, C, K, V]
  valid_c = _to_chunks(valid, chunk, False)  # [B, c, C]
  run_c = _to_chunks(run, chunk)  # [B, c, C]
  index_c = _to_chunks(index, chunk)  # [B, c, C]
  num_chunks = valid_c.shape[1]

  # ---- inside each chunk: the masked quadratic form
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))  # [C, C]
  pair = (causal & valid_c[..., :, None] & valid_c[..., None, :]
          & (run_c[..., :, None] == run_c[..., None, :]))  # [B, c, C(i), C(j)]
  distance = index_c[..., :, None] - index_c[..., None, :]  # [B, c, C, C]
  weights = decay_powers(log_decay, distance, pair, kv_axis=-3)  # [B, c, K or 1, C, C]
  scores = jnp.einsum("BciKGH,BcjKH->BcKGij", q, k, precision=precision)  # [B, c, K, G, C, C]
  scores = jnp.where(pair[:, :, None, None], scores * weights[:, :, :, None], 0.0)
  numerator = jnp.einsum("BcKGij,BcjKV->BciKGV", scores, v, precision=precision)  # [B,c,C,K,G,V]
  denominator = jnp.einsum("BcKGij->BciKG", scores)  # [B, c, C, K, G]

  # ---- each chunk's contribution to the state, as of its last visible token
  positions = jnp.arange(chunk, dtype=jnp.int32)
  last = jnp.max(jnp.where(valid_c, positions, -1), axis=-1)  # [B, c]
  has_tokens = last >= 0  # [B, c]
  at_last = lambda x: jnp.take_along_axis(x, jnp.maximum(last, 0)[..., None], axis=-1)[..., 0]
  last_run, last_index = at_last(run_c), at_last(index_c)  # [B, c]
  in_last_run = valid_c & (run_c == last_run[..., None])  # [B, c, C]
  k_weights = decay_powers(log_decay, last_index[..., None] - index_c, in_last_run,
                           kv_axis=-1)  # [B, c, C, K or 1]
  k_decayed = jnp.where(in_last_run[..., None, None], k * k_weights[..., None], 0.0)
  chunk_kv = jnp.einsum("BcjKH,BcjKV->BcKHV", k_decayed, v, precision=precision)  # [B,c,K,H,V]
  chunk_norm = jnp.sum(k_decayed, axis=2)  # [B, c, K, H]

  # ---- between chunks: carry the state (elementwise), keep the one each chunk starts from
  def carry_state(carry, chunk_inputs):
    kv, norm, run_now, index_now = carry
    kv_add, norm_add, has, run_new, index_new = chunk_inputs
    same = has & (run_new == run_now)  # [B]: the chunk continues the carried sequence
    decay = decay_powers(log_decay, index_new - index_now, same, kv_axis=-1)  # [B, K or 1]
    kept_kv = jnp.where(same[:, None, None, None], kv * decay[..., None, None], 0.0)
    kept_norm = jnp.where(same[:, None, None], norm * decay[..., None], 0.0)
    has4, has3 = has[:, None, None, None], has[:, None, None]
    new = (jnp.where(has4, kept_kv + kv_add, kv), jnp.where(has3, kept_norm + norm_add, norm),
           jnp.where(has, run_new, run_now), jnp.where(has, index_new, index_now))
    return new, carry

  start = (initial.kv.astype(jnp.float32), initial.norm.astype(jnp.float32),
           jnp.zeros((b,), jnp.int32), jnp.full((b,), -1, jnp.int32))
  time_major = lambda x: jnp.moveaxis(x, 1, 0)  # [B, c, ...] -> [c, B, ...]
  final, before = jax.lax.scan(
      carry_state, start,
      tuple(map(time_major, (chunk_kv, chunk_norm, has_tokens, last_run, last_index))))
  kv_in, norm_in, run_in, index_in = (jnp.moveaxis(x, 0, 1) for x in before)  # [B, c, ...]

  # ---- what each query reads from the state its chunk starts from
  sees_state = valid_c & (run_c == run_in[..., None])  # [B, c, C]
  q_weights = decay_powers(log_decay, index_c - index_in[..., None], sees_state,
                           kv_axis=-1)  # [B, c, C, K or 1]
  q_decayed = jnp.where(sees_state[..., None, None, None], q * q_weights[..., None, None], 0.0)
  numerator += jnp.einsum("BciKGH,BcKHV->BciKGV", q_decayed, kv_in, precision=precision)
  denominator += jnp.einsum("BciKGH,BcKH->BciKG", q_decayed, norm_in, precision=precision)

  if spec.normalize:
    safe = jnp.where(denominator == 0, 1.0, denominator)  # 0 only where nothing is visible
    numerator = numerator / safe[..., None]
  context = numerator.reshape(b, num_chunks * chunk, n, v_dim)[:, :t]  # [B, T, N, V]
  context = jnp.where(valid[:, :, None, None], context, 0.0).astype(query.dtype)
  return context, LinearState(final[0], final[1])
