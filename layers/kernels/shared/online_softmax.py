"""What every online-softmax kernel here shares: the masked logit, hiding invisible entries, the
step over a tile (the pure-JAX kernels) and the last step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked logits: finite, so a row with nothing visible stays NaN-free (its
# probabilities are zeroed explicitly, never left to exp() underflow).
NEG = -1e30

# Invisible entries (a padding token's q/k/v, a cache entry past its slot's
# length, a stale ring entry) may hold anything: NaN, inf, a previous
# sequence's data. Masking by multiplication leaks them (0 * NaN = NaN in
# p @ V, in dq = dLogits @ K, in dk = dLogits^T Q), so every kernel selects
# instead: logits of invisible pairs are replaced (jnp.where, never an added
# bias), and the rows of Q, K, V that no pair of a tile uses are replaced by
# zeros before they enter a product. A key visible to some query of the tile
# is left as it is: its value is real. The VJP of a select gives the
# unselected branch a zero cotangent, so the backward is safe too.


def live_keys(allowed: jax.Array) -> jax.Array:
  """[B, 1|K, 1|G, T, S] visibility -> [B, S, 1|K, 1]: keys some query of the tile sees."""
  return jnp.moveaxis(allowed.any(axis=(2, 3)), 1, 2)[..., None]


def live_queries(allowed: jax.Array) -> jax.Array:
  """[B, 1|K, 1|G, T, S] visibility -> [B, T, 1|K, 1|G, 1]: queries that see some key of it."""
  return jnp.moveaxis(allowed.any(axis=-1), 3, 1)[..., None]


def hide(x: jax.Array, live: jax.Array) -> jax.Array:
  """x where `live` (broadcast against it), else zeros: nothing invisible enters a product."""
  return jnp.where(live, x, jnp.zeros((), x.dtype))


def online_step(m, l, logits, allowed):
  """One online-softmax step over a tile: logits [..., t, s] (visible where `allowed`), the
  running max m and sum l [..., t] -> (m_new, l_new, p [..., t, s], correction [..., t]):
  p is zero where not allowed (selected, never exp() underflow), and what was accumulated
  before this tile is rescaled by correction."""
  logits = jnp.where(allowed, logits, NEG)
  m_new = jnp.maximum(m, logits.max(-1))  # [..., t]
  p = jnp.where(allowed, jnp.exp(logits - m_new[..., None]), 0.0)  # [..., t, s]
  correction = jnp.exp(m - m_new)  # [..., t]
  return m_new, l * correction + p.sum(-1), p, correction


def finish(l, acc):
  """acc / l, and zeros where nothing (not even a sink) was visible; l broadcasts against acc.
  `l != 0`, not `l > 0`: a NaN that reached a visible key stays NaN instead of reading as
  "nothing visible" (zeros)."""
  return jnp.where(l != 0, acc / jnp.maximum(l, 1e-30), 0.0)
