"""One decoder block: x + Attention(RMSNorm(x)), then + GatedMLP(RMSNorm(.)).

Block i builds `Attention(cfg, layer_idx=i)`, so `attention_layer_pattern`
(Gemma-2's local / global alternation, hybrid patterns) and the NoPE layers
of `nope_layer_interval` apply per block. Every mode of the layer passes
through: train (packed positions and segment ids), prefill and
autoregressive (the block's own KV cache, `slots`).
"""

from __future__ import annotations

import jax
from flax import nnx

from meshattn.kvcache.graph_epoch import TracksGraph
from meshattn.layers.attention import Attention
from meshattn.layers.mlp import GatedMLP, model_norm
from meshattn.layers.quantization import projection_dot_general
from meshattn.sharding import constrain


class DecoderBlock(TracksGraph, nnx.Module):
  """Pre-norm residual block [RMSNorm, Attention, RMSNorm, gated MLP]: [B, T, D] -> [B, T, D]."""

  def __init__(self, config, *, layer_idx: int, mesh: jax.sharding.Mesh | None, rngs: nnx.Rngs):
    self.attention = Attention(config, mesh=mesh, rngs=rngs, layer_idx=layer_idx)
    s = self.attention.settings
    self.mesh = mesh
    norm = dict(epsilon=s.normalization_layer_epsilon, dtype=s.dtype, weight_dtype=s.weight_dtype)
    self.pre_attention_norm = model_norm(s.emb_dim, **norm)
    self.pre_mlp_norm = model_norm(s.emb_dim, **norm)
    self.mlp = GatedMLP(s.emb_dim, config.mlp_dim, rngs=rngs, activation=config.mlp_activation,
                        dtype=s.dtype, weight_dtype=s.weight_dtype, precision=s.precision,
                        dot_general=projection_dot_general(s.quantization), mesh=mesh,
                        rules=s.logical_axis_rules)

  def __call__(self, x: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None, *,
               model_mode: str, slots: jax.Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    s = self.attention.settings
    axes = s.axes[model_mode].inputs  # [batch, length, embed] names of this mode
    attended = self.attention(self.pre_attention_norm(x), inputs_positions=positions,
                              decoder_segment_ids=segment_ids, model_mode=model_mode,
                              slots=slots, deterministic=deterministic, rngs=rngs)  # [B, T, D]
    x = x + attended  # [B, T, D]
    x = x + self.mlp(self.pre_mlp_norm(x), axes)  # [B, T, D]
    return constrain(x, axes, self.mesh, s.logical_axis_rules)
