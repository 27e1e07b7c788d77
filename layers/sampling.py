"""Token sampling for the serving engine: greedy, temperature, top-k and top-p (nucleus).

    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7)   # vLLM's fields

`SamplingParams` is one request's choice, checked on the host (a bad value raises
ValueError naming the field before anything is queued). `sample` runs inside the
engine's compiled step on a batch of rows, each with its own parameters: the
parameters travel as arrays, so one compiled step serves any mix of greedy and
sampled requests.

Reproducible whatever the schedule: the random key of the token at position p of a
request is fold_in(fold_in(key(0), seed), p), so a request's tokens depend on its
prompt, its parameters, its seed and the bits of its logits only, not on which slot,
step or neighbours it had (the logits themselves may differ in their last bits between
batch shapes on an accelerator). `seed=None` in `Engine.submit` uses the request id.

Order of the filters (as in vLLM / Hugging Face): logits / temperature, then top-k
(the tokens reaching the k-th largest value, ties with it included), then top-p (the
shortest prefix of the ranking, ties broken by lower token id, whose probability
reaches p; the most likely token always stays), then one draw from the renormalized
distribution. temperature 0 is greedy (argmax of the raw logits, the
first maximum), whatever top-k / top-p say.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request picks its tokens. temperature 0: greedy (default); top_k 0 and
  top_p 1: off; seed: the request's random stream (None: the engine uses the request id)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None

  def __post_init__(self):
    problem = params_problem(self)
    if problem:
      raise ValueError(f"SamplingParams: {problem}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def params_problem(params: SamplingParams) -> str | None:
  """What is wrong with params (naming the field and what is allowed), or None."""
  t, k, p, seed = params.temperature, params.top_k, params.top_p, params.seed
  if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
    return f"temperature must be a finite number >= 0 (0: greedy), got {t!r}"
  if (isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral)
      or not 0 <= k < 2**31):  # it travels as int32
    return f"top_k must be an integer in [0, 2**31) (0: off), got {k!r}"
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
    return f"top_p must be a number in (0, 1] (1: off), got {p!r}"
  if seed is not None and (isinstance(seed, (bool, np.bool_))
                           or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32):
    return f"seed must be an integer in [0, 2**32) or None, got {seed!r}"
  return None


def token_key(seed: jax.Array, position: jax.Array) -> jax.Array:
  """The key of the token at `position` [] of the request with `seed` [] (uint32)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed), position)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seed: jax.Array, position: jax.Array) -> jax.Array:
  """Token ids [R] int32 from logits [R, V], one request's parameters per row: temperature
  [R] float32 (0: greedy), top_k [R] int32 (0: off), top_p [R] float32 (1: off), seed [R]
  uint32 and position [R] int32 (the position the token will take in its sequence)."""
  logits = logits.astype(jnp.float32)  # [R, V]
  rows, vocab = logits.shape
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [R]
  # Shift by the row's max before dividing: a tiny temperature then sends every other
  # logit to -inf and keeps the max at 0 (dividing first overflows to inf, and the
  # softmax of several infs is NaN). The shift changes no probability.
  top = jnp.max(logits, axis=-1, keepdims=True)  # [R, 1]
  shifted = logits - jnp.where(jnp.isfinite(top), top, 0.0)  # [R, V]
  scaled = shifted / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # [R, V]
  order = jnp.argsort(-scaled, axis=-1, stable=True)  # [R, V] ranks -> ids; ties: lower id first
  ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [R, V] descending
  # top-k by value, as vLLM and Hugging Face: what reaches the k-th largest value stays
  # (tokens tied with it included).
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # [R]
  kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)  # [R, 1]
  ranked = jnp.where(ranked >= kth, ranked, _NEG)  # [R, V]
  # top-p by rank over what top-k kept: a token stays while the mass ranked strictly
  # before it is < p (the smallest prefix reaching p; rank 0 always stays). Ties are cut
  # by rank, so a tied token outside the prefix is not let back in.
  probs = jax.nn.softmax(ranked, axis=-1)  # [R, V]
  before = jnp.cumsum(probs, axis=-1) - probs  # [R, V]
  # (top_p 1 keeps all: float32 sums may reach 1 before the tail.)
  within = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # [R, V]
  kept_by_rank = within & (ranked > _NEG)  # [R, V]
  kept = jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], order].set(kept_by_rank)
  filtered = jnp.where(kept, scaled, _NEG)  # [R, V]
  keys = jax.vmap(token_key)(seed, position)  # [R]
  drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)  # [R]
  return jnp.where(temperature > 0, drawn, greedy)  # [R]
