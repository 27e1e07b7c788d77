"""The train kernels a prefill step can run instead of the block-by-block cached pass.

`cached_step` reads the cache block by block with an online softmax: the
reference, and what every cache kind and mask supports. Two cases have a
faster exact equivalent through the layer's train kernel (flash on GPU/TPU):
- a fresh prompt (every slot empty): train-mode attention over the prompt;
- a chunk continuing its slots (no ring buffer): the chunk is written first
  and attends over the whole slot under an explicit position mask (where the
  split path of prefill_split.py is exact and has a kernel, it runs instead:
  no dense mask).
Both return None where no tiled kernel serves the request.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from meshattn.layers.kernels import dispatch
from meshattn.layers.masks import MaskSpec


def fresh_prompt_attention(layer, axes, *, padded: bool, sinks, length: int | None = None):
  """Attention for a prefill step on empty slots: the train kernel over the prompt itself.

  Returns fn(query, key, value, valid) -> context [b, T, N, H] for
  `cached_step`, or None when no train kernel serves the request. The
  prompt is at positions 0..T-1 and right-padded, so a causal / window /
  chunk mask never shows a real query a padding key; a bidirectional
  (`full`) layer excludes padding keys by segment ids (valid 1, padding 0).
  Padding queries output zeros, as on the cached path.
  """
  segments = padded and not layer.settings.mask.is_causal
  features = dispatch.call_features(layer.settings, "train", segments=segments) - {"backward"}
  try:
    kernel, layout = layer._kernel_fn("train", features, (length, length))
  except ValueError:  # e.g. `flash` on CPU, or no segment ids: the cached path serves it
    return None
  options = dispatch.kernel_options(layer.settings)

  def attend(query, key, value, valid):
    b, t = valid.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [b, T] = positions
    seg = valid.astype(jnp.int32) if segments else None  # [b, T]
    context, _ = layer._call_kernel(
        kernel, axes, query, key, value, layout=layout, options=options,
        q_positions=idx, kv_positions=idx,
        q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks, mask=None, bias=None,
        dropout_rng=None, deterministic=True)  # [b, T, N, H]
    return jnp.where(valid[:, :, None, None], context, 0.0).astype(query.dtype)

  return attend

def whole_slot_attention(layer, axes, *, sinks, lengths=(None, None)):
  """Attention for a prefill step on non-empty slots: a tiled train kernel over the whole
  slot under an explicit mask (see cached_step), or None where only the reference
  `dot_product` serves it (it would materialise [b, N, T, C] logits; the block-by-block
  cached path is the better reference then)."""
  structural = {"causal", "window", "chunk", "full", "backward"}
  features = (dispatch.call_features(layer.settings, "train", mask=True) - structural) | {"full"}
  try:
    selected = dispatch.select(layer.settings, "train", features, lengths)
  except ValueError:
    return None
  if selected.materializes_logits:
    return None
  kernel, layout = dispatch.load(layer.settings, selected), selected.length_layout
  options = dataclasses.replace(dispatch.kernel_options(layer.settings), mask=MaskSpec("full"))

  def attend(query, key, value, mask, q_positions, kv_positions):
    if layout == "whole":  # kernels that mask by token index: the mask carries the positions
      q_positions = jnp.broadcast_to(jnp.arange(query.shape[1], dtype=jnp.int32), q_positions.shape)
      kv_positions = jnp.broadcast_to(jnp.arange(key.shape[1], dtype=jnp.int32), kv_positions.shape)
    context, _ = layer._call_kernel(
        kernel, axes, query, key, value, layout=layout, options=options,
        q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=None,
        kv_segment_ids=None, sinks=sinks, mask=mask, bias=None, dropout_rng=None,
        deterministic=True)  # [b, T, N, H]
    return context

  return attend
