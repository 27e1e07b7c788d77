"""A train-mode call's inputs as the kernels take them: one flat batch axis, checked.

The layer accepts any leading batch dims (`[batch..., length, features]`, Flax's
convention), positions that default to token indices (or MRoPE streams), optional
packing ids for queries and keys, and a mask / bias broadcastable to
`[batch..., heads, T, S]`. `flatten_train_inputs` checks them (every error names the
argument) and flattens them to `[B, ...]`; `packed_kernel_args` rewrites a packed
call's kernel arguments so each packed sequence gets the mask it has alone.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from meshattn.layers.masks import MaskSpec, packed_mask_inputs
from meshattn.layers.positions import flatten_positions


@dataclasses.dataclass(frozen=True)
class TrainInputs:
  """A train call's inputs over one flat batch axis B = prod(batch_shape)."""
  batch_shape: tuple[int, ...]  # the caller's leading dims, restored on the output
  self_attention: bool  # keys and values come from inputs_q itself
  x_q: jax.Array  # [B, T, D]
  x_kv: jax.Array  # [B, S, D_kv] (x_q itself for self-attention)
  x_v: jax.Array | None  # [B, S, D_kv]: separate value inputs, or None
  q_idx: jax.Array  # [B, T] token index: the structural mask runs on it in train mode
  kv_idx: jax.Array  # [B, S]
  q_pos: jax.Array  # [B, T] (MRoPE [n, B, T]): RoPE positions
  kv_pos: jax.Array  # [B, S] (MRoPE [n, B, S])
  q_seg: jax.Array | None  # [B, T] packing ids
  kv_seg: jax.Array | None  # [B, S] (q_seg unless kv_segment_ids were given)
  kv_segment_ids_given: bool  # cross-attention packing: separate ids for the keys
  mask: jax.Array | None  # [B, N|1, T|1, S|1]
  bias: jax.Array | None  # [B, N|1, T|1, S|1]

  @property
  def batch(self) -> int:
    return self.x_q.shape[0]

  @property
  def lengths(self) -> tuple[int, int]:
    """(query length T, key length S)."""
    return self.x_q.shape[1], self.x_kv.shape[1]


def flatten_train_inputs(inputs_q, inputs_kv, inputs_v, inputs_positions, inputs_kv_positions,
                         decoder_segment_ids, kv_segment_ids, mask, bias, *,
                         position_streams: int) -> TrainInputs:
  """Check a train call's inputs (see `Attention.__call__`) and flatten their batch dims."""
  self_attention = (inputs_kv is None or inputs_kv is inputs_q) and inputs_v is None
  if inputs_kv is None:
    inputs_kv = inputs_q
  if inputs_q.ndim < 3 or inputs_kv.ndim != inputs_q.ndim:
    raise ValueError(f"inputs_q {inputs_q.shape} and inputs_kv {inputs_kv.shape} must be "
                     "[batch..., length, features] with the same batch dims")
  batch_shape = inputs_q.shape[:-2]
  if inputs_kv.shape[:-2] != batch_shape:
    raise ValueError(f"inputs_kv batch dims {inputs_kv.shape[:-2]} != inputs_q batch dims {batch_shape}")
  if inputs_v is not None and inputs_v.shape[:-1] != inputs_kv.shape[:-1]:
    raise ValueError(f"inputs_v {inputs_v.shape} must match inputs_kv {inputs_kv.shape} "
                     "but for the features")
  q_len, kv_len = inputs_q.shape[-2], inputs_kv.shape[-2]
  batch = math.prod(batch_shape)

  def flat(x, trailing):  # [batch..., *trailing] (leading dims broadcast) -> [B, *trailing]
    if x is None:
      return None
    x = jnp.broadcast_to(x, batch_shape + x.shape[x.ndim - trailing:])
    return x.reshape((batch,) + x.shape[len(batch_shape):])

  x_q = flat(inputs_q, 2)  # [B, T, D]
  x_kv = x_q if self_attention else flat(inputs_kv, 2)  # [B, S, D_kv]
  x_v = flat(inputs_v, 2)  # [B, S, D_kv] or None
  q_idx = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))  # [B, T]
  kv_idx = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))  # [B, S]
  q_pos = flatten_positions(inputs_positions, batch_shape, position_streams, "inputs_positions")
  q_pos = q_idx if q_pos is None else q_pos  # [B, T] or MRoPE [n, B, T]
  kv_pos = flatten_positions(inputs_kv_positions, batch_shape, position_streams,
                             "inputs_kv_positions")
  for name, pos, want in (("inputs_positions", q_pos, q_len), ("inputs_kv_positions", kv_pos,
                                                                  kv_len)):
    if pos is not None and pos.shape[-1] != want:
      raise ValueError(f"{name} has its last axis of length {pos.shape[-1]}: it must be the "
                       f"{'query' if name == 'inputs_positions' else 'key'} length {want} "
                       f"([batch..., {want}])")
  if kv_pos is None:
    # Decided by shape, not identity: under jit the same array passed twice
    # arrives as two tracers.
    kv_pos = q_pos if kv_len == q_len else kv_idx
  for name, ids, want in (("decoder_segment_ids", decoder_segment_ids, q_len),
                          ("kv_segment_ids", kv_segment_ids, kv_len)):
    if ids is not None and (jnp.ndim(ids) < 1 or jnp.shape(ids)[-1] != want):
      raise ValueError(f"{name} has shape {jnp.shape(ids)}; its last axis must be the "
                       f"{'query' if name[0] == 'd' else 'key'} length {want} ([batch..., {want}])")
  q_seg = flat(decoder_segment_ids, 1)  # [B, T]
  kv_seg = flat(kv_segment_ids, 1) if kv_segment_ids is not None else q_seg  # [B, S]
  if q_seg is not None and kv_seg.shape[-1] != kv_len:
    raise ValueError(f"cross-attention (key length {kv_len} != query length {q_len}) with "
                     "decoder_segment_ids also needs kv_segment_ids [batch..., S]")
  return TrainInputs(
      batch_shape=batch_shape, self_attention=self_attention, x_q=x_q, x_kv=x_kv, x_v=x_v,
      q_idx=q_idx, kv_idx=kv_idx, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
      kv_segment_ids_given=kv_segment_ids is not None,
      mask=flatten_pairwise(mask, batch_shape, batch, (q_len, kv_len), "mask"),
      bias=flatten_pairwise(bias, batch_shape, batch, (q_len, kv_len), "bias"))


def flatten_pairwise(x: jax.Array | None, batch_shape: tuple[int, ...], batch: int,
                     lengths: tuple[int, int] | None = None, name: str = "mask/bias"):
  """A mask/bias broadcastable to [batch..., heads, T, S] -> [B, heads|1, T|1, S|1];
  `lengths` (T, S), where known, are checked, and the batch dims are, naming `name`."""
  if x is None:
    return None
  rank = len(batch_shape) + 3
  if x.ndim > rank:
    raise ValueError(f"{name} of shape {x.shape} has more dims than [batch..., heads, q_len, kv_len]")
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  want = tuple(batch_shape) + (None,) + (tuple(lengths) if lengths else (None, None))
  if any(w is not None and n not in (1, w) for n, w in zip(x.shape, want)):
    shown = ", ".join("heads" if w is None else str(w) for w in want)
    raise ValueError(f"{name} has shape {x.shape}: it must broadcast to [batch..., heads, q_len, "
                     f"kv_len] = [{shown}] (each dim that size or 1)")
  x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
  return x.reshape((batch,) + x.shape[len(batch_shape):])


def packed_kernel_args(kernel_args: dict, inputs: TrainInputs, mask: MaskSpec, *,
                       by_index: bool) -> dict:
  """Packed rows (one ids array for queries and keys): each sequence gets the mask it has
  alone, chunks counted from its first token (masks.packed_mask_inputs). `by_index`: the
  kernel masks by token index (a "whole" length layout). Other calls keep their arguments."""
  if inputs.q_seg is None or inputs.kv_segment_ids_given:
    return kernel_args
  spec, pos, seg = packed_mask_inputs(mask, inputs.q_seg, by_index=by_index)
  return dict(kernel_args, options=dataclasses.replace(kernel_args["options"], mask=spec),
              q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
