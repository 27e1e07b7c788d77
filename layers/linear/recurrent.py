"""Causal linear attention, recurrent form: one token per sequence against its state.

The decode step of a linear-attention layer reads and writes a state of fixed
size (see `chunkwise.LinearState`), whatever the sequence length:

    S' = gamma S + phi(k) v^T      z' = gamma z + phi(k)
    out = phi(q) S' [ / phi(q) . z' ]

Einsum letters: B batch, K kv heads, G group, H key (feature) dim, V value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshattn.layers.linear.chunkwise import LinearState
from meshattn.layers.linear.spec import LinearSpec


def linear_attention_step(query: jax.Array, key: jax.Array, value: jax.Array,
                          state: LinearState, *, spec: LinearSpec, scale: float = 1.0,
                          valid: jax.Array | None = None,
                          continues: jax.Array | None = None,
                          log_decay: jax.Array | None = None,
                          precision=None) -> tuple[jax.Array, LinearState]:
  """query [B, N, H], key [B, K, H], value [B, K, V], state as of each row's last token
  -> (context [B, N, V], the state after this token).

  valid [B] (default all): rows whose token is real; the others output zeros
  and keep their state. continues [B] (default all): rows whose state belongs
  to the same sequence; the others start a new one (the state is dropped).
  log_decay [K]: as in `chunkwise.linear_attention`.
  """
  b, n, h = query.shape
  kv_heads = key.shape[1]
  group = n // kv_heads
  valid = jnp.ones((b,), bool) if valid is None else valid
  continues = jnp.ones((b,), bool) if continues is None else continues
  if log_decay is None:
    log_decay = spec.log_decay(kv_heads)  # [K] or None
  row = valid[:, None, None]  # [B, 1, 1]
  # An invisible row's token (it may hold NaN) is selected away before the feature map and
  # after it, as in the chunkwise form.
  hide = lambda x: jnp.where(row, x, jnp.zeros((), x.dtype))
  q = hide(spec.features(hide(query)) * scale).reshape(b, kv_heads, group, h)  # [B, K, G, H]
  k = hide(spec.features(hide(key)))  # [B, K, H] float32
  v = hide(value.astype(jnp.float32))  # [B, K, V]
  decay = (jnp.ones((1, 1), jnp.float32) if log_decay is None
           else jnp.exp(log_decay)[None, :])  # [1, K or 1]
  keep = continues[:, None, None]  # [B, 1, 1]
  kv = jnp.where(keep[..., None], state.kv * decay[..., None, None], 0.0)  # [B, K, H, V]
  kv = kv + jnp.einsum("BKH,BKV->BKHV", k, v, precision=precision)
  norm = jnp.where(keep, state.norm * decay[..., None], 0.0) + k  # [B, K, H]
  numerator = jnp.einsum("BKGH,BKHV->BKGV", q, kv, precision=precision)  # [B, K, G, V]
  if spec.normalize:
    denominator = jnp.einsum("BKGH,BKH->BKG", q, norm, precision=precision)  # [B, K, G]
    numerator = numerator / jnp.where(denominator == 0, 1.0, denominator)[..., None]
  context = jnp.where(row, numerator.reshape(b, n, -1), 0.0).astype(query.dtype)  # [B, N, V]
  new = LinearState(jnp.where(row[..., None], kv, state.kv), jnp.where(row, norm, state.norm))
  return context, new
