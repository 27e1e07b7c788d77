"""What every online-softmax kernel here shares: the masked logit and the last step."""

from __future__ import annotations

import jax.numpy as jnp

# Masked logits: finite, so a row with nothing visible stays NaN-free (its
# probabilities are zeroed explicitly, never left to exp() underflow).
NEG = -1e30


def finish(l, acc):
  """acc / l, and zeros where nothing (not even a sink) was visible; l broadcasts against acc."""
  return jnp.where(l > 0, acc / jnp.maximum(l, 1e-30), 0.0)
