"""Token positions as the layer takes them: flattening (extra batch dims, MRoPE streams) and
Llama 4's position-dependent query temperature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def flatten_positions(positions: jax.Array | None, batch_shape: tuple[int, ...], streams: int,
                      name: str) -> jax.Array | None:
  """Positions [batch..., L] -> [B, L] (leading dims broadcast), or, when the layer takes
  `streams` > 1 position streams (MRoPE), [streams, batch..., L] -> [streams, B, L]."""
  if positions is None:
    return None
  batch = math.prod(batch_shape)
  lead = () if positions.ndim <= len(batch_shape) + 1 else (streams,)
  if lead and (streams == 1 or positions.ndim != len(batch_shape) + 2
               or positions.shape[0] != streams):
    raise ValueError(f"{name} has shape {positions.shape}: expected [batch..., length]"
                     + (f" or [{streams}, batch..., length] (MRoPE streams)" if streams > 1
                        else " (position streams need use_mrope / mrope_section)"))
  length = positions.shape[-1]
  given = positions.shape[len(lead):-1]  # its batch dims, which broadcast to batch_shape
  if len(given) > len(batch_shape) or any(g not in (1, b) for g, b in
                                           zip(given[::-1], tuple(batch_shape)[::-1])):
    raise ValueError(f"{name} has shape {positions.shape}: its batch dims {given} must "
                     f"broadcast to the inputs' batch dims {tuple(batch_shape)}")
  positions = jnp.broadcast_to(positions, lead + tuple(batch_shape) + (length,))
  return positions.reshape(lead + (batch, length))


def temperature_tune(query: jax.Array, positions: jax.Array, *, scale: float,
                     floor_scale: float) -> jax.Array:
  """Llama 4's NoPE layers: query [B, T, N, H] times log(floor((p + 1) / floor_scale) + 1) *
  scale + 1 at position p [B, T] (float32: positions past 256 are not exact in bfloat16)."""
  p = positions.astype(jnp.float32)
  scales = jnp.log(jnp.floor((p + 1.0) / floor_scale) + 1.0) * scale + 1.0  # [B, T]
  return (query.astype(jnp.float32) * scales[:, :, None, None]).astype(query.dtype)
