"""The gated MLP of a decoder block (SwiGLU / GeGLU) and the model-width RMSNorm.

    mlp = GatedMLP(emb_dim=64, mlp_dim=256, rngs=nnx.Rngs(0))
    y = mlp(x)                                   # x: [batch, length, emb_dim]

y = (act(x @ wi_0) * (x @ wi_1)) @ wo, as in Llama / Gemma (MaxText's `mlp`
with two `wi` kernels). Parameters carry logical names (`embed`, `mlp`), the
hidden activation is constrained to `(batch, length, activation_mlp)`, and
the two results are named checkpoints (`mlpwi`, `mlpwo`) for remat policies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from meshattn.configs.validation import MLP_ACTIVATIONS
from meshattn.kvcache.graph_epoch import TracksGraph
from meshattn.layers.projections import DenseGeneral, RMSNorm
from meshattn.sharding import constrain

_ACTIVATIONS: dict[str, Any] = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}
assert set(_ACTIVATIONS) == set(MLP_ACTIVATIONS)  # the allowed values live in configs


class GatedMLP(TracksGraph, nnx.Module):
  """act(x W0) * (x W1) -> W2: [B, T, D] -> [B, T, D] through F hidden features."""

  def __init__(self, emb_dim: int, mlp_dim: int, *, rngs: nnx.Rngs, activation: str = "silu",
               dtype=jnp.float32, weight_dtype=jnp.float32, precision=None, dot_general=None,
               mesh: jax.sharding.Mesh | None = None, rules: Sequence[tuple[str, Any]] = ()):
    if activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation={activation!r}: allowed {list(MLP_ACTIVATIONS)}")
    self.activation = activation
    self.mesh, self.rules = mesh, tuple(rules)
    dense = dict(rngs=rngs, dtype=dtype, weight_dtype=weight_dtype, precision=precision,
                 dot_general=dot_general)  # AQT int8 with `quantization: int8`
    self.wi_0 = DenseGeneral((emb_dim,), (mlp_dim,), kernel_axes=("embed", "mlp"), **dense)
    self.wi_1 = DenseGeneral((emb_dim,), (mlp_dim,), kernel_axes=("embed", "mlp"), **dense)
    self.wo = DenseGeneral((mlp_dim,), (emb_dim,), kernel_axes=("mlp", "embed"), **dense)

  def __call__(self, x: jax.Array, input_axes: Sequence[str | None]) -> jax.Array:
    """x [B, T, D] laid out by `input_axes` (the mode's [batch, length, embed] names)."""
    hidden_axes = (input_axes[0], input_axes[1], "activation_mlp")
    gate = self.wi_0(x)  # [B, T, F]
    up = self.wi_1(x)  # [B, T, F]
    hidden = _ACTIVATIONS[self.activation](gate) * up  # [B, T, F]
    hidden = checkpoint_name(constrain(hidden, hidden_axes, self.mesh, self.rules), "mlpwi")
    out = self.wo(hidden)  # [B, T, D]
    return checkpoint_name(constrain(out, input_axes, self.mesh, self.rules), "mlpwo")


def model_norm(emb_dim: int, *, epsilon: float, dtype, weight_dtype) -> RMSNorm:
  """RMSNorm over the model width D (scale [D], logical name `norm`: replicated)."""
  return RMSNorm(emb_dim, epsilon=epsilon, scale_axes=("norm",), dtype=dtype,
                 weight_dtype=weight_dtype)
