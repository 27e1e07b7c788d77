"""The train path's context: which kernel attends, with which arguments (and the sown weights).

A linear-attention layer runs its chunkwise form (layers/linear); a layer given
a Flax `attention_fn` runs that; any other asks the registry (through the
layer's `_kernel_fn` / `_call_kernel` hooks, which the Flax drop-in wraps) for
the kernel that serves every feature of the call.
"""

from __future__ import annotations

import jax
from flax import nnx

from meshattn.layers.kernels import dispatch
from meshattn.layers.kernels.train.flax_fn import call_flax_attention_fn
from meshattn.layers.linear.steps import linear_train
from meshattn.layers.train_inputs import TrainInputs, packed_kernel_args


def train_context(layer, query: jax.Array, key: jax.Array, value: jax.Array, inputs: TrainInputs, *,
                  axes, deterministic: bool, rngs: nnx.Rngs | None,
                  sow_weights: bool) -> jax.Array:
  """The context [B, T, N, H] of `layer` for query [B, T, N, H] and key / value [B, S, K, H]
  of the flattened `inputs`; with `sow_weights` the layer sows the attention weights
  [batch..., N, T, S] as `attention_weights` (nnx.Intermediate)."""
  context, weights = _attend(layer, query, key, value, inputs, axes=axes,
                             deterministic=deterministic, rngs=rngs, sow_weights=sow_weights)
  if sow_weights and weights is not None:
    layer.sow(nnx.Intermediate, "attention_weights",
              weights.reshape(inputs.batch_shape + weights.shape[1:]))
  return context


def _attend(layer, query, key, value, inputs: TrainInputs, *, axes, deterministic, rngs,
            sow_weights) -> tuple[jax.Array, jax.Array | None]:
  """(context [B, T, N, H], weights [B, N, T, S] or None)."""
  s = layer.settings
  dropout_rng = None
  if s.dropout_rate > 0 and not deterministic:
    # Dropout draws from the layer's own stream unless the call passes rngs.
    dropout_rng = (rngs if rngs is not None else layer.rngs).dropout()
  sinks = layer.sinks[...] if s.attention_sink else None
  # The structural mask runs on token index in train mode (positions only rotate).
  kernel_args = dict(options=dispatch.kernel_options(s), q_positions=inputs.q_idx,
                     kv_positions=inputs.kv_idx, q_segment_ids=inputs.q_seg,
                     kv_segment_ids=inputs.kv_seg, sinks=sinks, mask=inputs.mask,
                     bias=inputs.bias, dropout_rng=dropout_rng, deterministic=deterministic)
  if s.linear is not None:
    context = linear_train(query, key, value, spec=s.linear, scale=s.scale,
                           segment_ids=inputs.q_seg, precision=s.precision, mesh=layer.mesh,
                           rules=s.logical_axis_rules, axes=axes)  # [B, T, N, H]
    return context, None
  if s.attention_fn is not None:
    return call_flax_attention_fn(s.attention_fn, query, key, value, dtype=s.dtype,
                                  precision=s.precision,
                                  **packed_kernel_args(kernel_args, inputs, s.mask, by_index=False))
  dropout_on = dropout_rng is not None
  features = dispatch.call_features(s, "train", segments=inputs.q_seg is not None,
                                    mask=inputs.mask is not None, bias=inputs.bias is not None,
                                    dropout=dropout_on, weights=sow_weights)
  kernel, layout = layer._kernel_fn("train", features, inputs.lengths)
  # Explicit partitioning; dropout and sown weights run auto-sharded
  # instead (one shard's RNG stream would repeat on every shard).
  return layer._call_kernel(kernel, axes, query, key, value, shard=not dropout_on and not sow_weights,
                            layout=layout, return_weights=sow_weights,
                            **packed_kernel_args(kernel_args, inputs, s.mask,
                                                 by_index=layout == "whole"))
