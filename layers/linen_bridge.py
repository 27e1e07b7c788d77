"""`attention_as_linen`: the NNX Attention layer inside a Linen model.

Parameters keep their NNX names and logical axis names (as Linen
`LogicallyPartitioned` boxes through the bridge's metadata conversion).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from meshattn.layers.attention import Attention


def attention_as_linen(config=None, *, mesh: jax.sharding.Mesh | None = None,
                       name: str | None = None, layer_idx: int = 0, **overrides: Any) -> nn.Module:
  """A Linen module wrapping `Attention(config, mesh=mesh, **overrides)`.

  Call it like the NNX layer: `module.apply(variables, x, x, inputs_positions=...,
  model_mode="train")`. Parameters are created under the `params` collection
  from the Linen `params` rng; dropout uses the Linen `dropout` rng.
  """
  return nnx.bridge.to_linen(Attention, config, mesh=mesh, layer_idx=layer_idx, name=name,
                             **overrides)
