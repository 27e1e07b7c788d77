"""Length-aware split-K (flash-decoding) for the GPU decode kernels: which blocks each
program reads, how many splits a grid gets, the order rows launch in, the merge of the
partials, and the Triton call that runs a decode kernel unsplit or split and merged. See
ragged.py for the design."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from meshattn.layers.kernels.decode.decode_common import split_bounds
from meshattn.layers.kernels.shared.online_softmax import NEG, finish


# ---- length-aware split-K ---------------------------------------------------------------


def split_nonempty(first, last, num_splits: int, blocks_per_split: int):
  """[B, P] bool: split p of row b holds blocks (first, last [B] as in the kernel)."""
  split = jnp.arange(num_splits, dtype=jnp.int32)[None, :]  # [1, P]
  start, end = split_bounds(first[:, None], last[:, None], split, blocks_per_split)
  return start < end


def combine_splits(m, l, acc, nonempty, sink, dtype):
  """Merge split partials over axis 2 (P) -> acc's shape without that axis, in dtype.

  The flash-decoding reduction. acc is [B, K, P, ...] in either layout a
  kernel writes ([B, K, P, G, H] or, transposed, [B, K, P, H, G]); m and l
  have acc's shape with size 1 on the head_dim axis, so the weights are
  computed once per (row, head, split) on these small arrays and the one
  pass over acc is a weighted sum in acc's own layout (no transpose, no exp
  per element). nonempty [B, P] says which partials the kernel wrote; the
  others were never written (they may hold anything, NaN included) and are
  selected away, not multiplied by zero. The sink (broadcastable to m
  without B and P, or None) is one more partial with l = 1 and no value, so
  it is counted exactly once. A row with nothing visible (no split, no sink)
  gives zeros.
  """
  written = nonempty.reshape(nonempty.shape + (1,) * (acc.ndim - 3))  # [B, P, 1, 1]
  written = jnp.expand_dims(written, 1)  # [B, 1, P, 1, 1]
  m = jnp.where(written, m, NEG)  # [B, K, P, ...] with 1 on head_dim
  m_all = jnp.max(m, axis=2)  # [B, K, ...]
  if sink is not None:
    m_all = jnp.maximum(m_all, sink)
  weight = jnp.where(written, jnp.exp(m - jnp.expand_dims(m_all, 2)), 0.0)  # m's shape
  l_all = jnp.sum(weight * jnp.where(written, l, 0.0), axis=2)  # [B, K, ...]
  if sink is not None:
    l_all = l_all + jnp.exp(sink - m_all)
  acc_all = jnp.sum(jnp.where(written, acc, 0.0) * weight, axis=2)  # acc without P
  return finish(l_all, acc_all).astype(dtype)


# Programs per SM the automatic split layout aims for when every row is at
# the longest possible length: enough that ragged batches (fewer non-empty
# programs) still fill the GPU a few times over, and that the last wave is a
# small part of the whole (each program is at most blocks_per_split blocks).
PROGRAMS_PER_SM = 16


# A split shorter than this many blocks costs more in partial writes, query
# loads and pipeline fill than it saves.
MIN_BLOCKS_PER_SPLIT = 8


_DEFAULT_SM_COUNT = 132  # H100 SXM, when the device does not say


def sm_count() -> int:
  """Streaming multiprocessors of the default device (132 when it does not report them)."""
  try:
    count = getattr(jax.devices()[0], "core_count", None)
  except RuntimeError:
    count = None
  return int(count) if count else _DEFAULT_SM_COUNT


def auto_num_splits(programs: int, max_blocks: int, *, cores: int | None = None) -> int:
  """Splits of a longest row so the grid has about PROGRAMS_PER_SM programs per SM.

  programs: batch * kv_heads; max_blocks: loop steps of the longest possible
  row. 1 (the unsplit kernel) when the grid already fills the GPU.
  """
  cores = sm_count() if cores is None else cores
  want = pl.cdiv(PROGRAMS_PER_SM * cores, max(programs, 1))
  return int(max(1, min(want, max_blocks // MIN_BLOCKS_PER_SPLIT)))


def launch_order(lengths: jax.Array) -> jax.Array:
  """[B] int32: the rows by decreasing length (ties in row order), the order programs launch in.

  Programs start in grid order as SMs free up, so launching the longest
  rows first is longest-processing-time-first scheduling: the short rows
  fill the gaps at the end instead of a long row starting last and running
  alone. On the H200 this took b64 at lengths uniform in [1, 4096] from
  1.07x to 1.54x the bfloat16 kernel, unsplit, in one A/B run
  (docs/benchmarks.md).
  """
  return jnp.argsort(-lengths, stable=True).astype(jnp.int32)


def split_layout(max_blocks: int, *, programs: int, num_splits: int | None,
                 blocks_per_split: int | None, interpret: bool) -> tuple[int, int]:
  """(blocks_per_split, splits P) of the GPU grid (batch, kv_heads, P); P == 1: unsplit kernel.

  blocks_per_split fixes each program's block range; num_splits instead
  gives the splits of a longest row (blocks_per_split = ceil(max_blocks /
  num_splits)); neither: automatic on a GPU (`auto_num_splits`), 1 when
  interpreting on CPU. max_blocks bounds the loop steps of any row (the
  cache capacity, or the window), so P = ceil(max_blocks / blocks_per_split)
  splits cover every row.
  """
  max_blocks = max(int(max_blocks), 1)
  if num_splits is not None and blocks_per_split is not None:
    raise ValueError("give num_splits or blocks_per_split, not both")
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"num_splits={num_splits}: must be >= 1 (or None)")
  if blocks_per_split is not None and blocks_per_split < 1:
    raise ValueError(f"blocks_per_split={blocks_per_split}: must be >= 1 (or None)")
  if blocks_per_split is None:
    if num_splits is None:
      num_splits = 1 if interpret else auto_num_splits(programs, max_blocks)
    blocks_per_split = pl.cdiv(max_blocks, num_splits)
  blocks_per_split = min(int(blocks_per_split), max_blocks)
  return blocks_per_split, pl.cdiv(max_blocks, blocks_per_split)


def split_out_specs(batch, kv_heads, num_splits, group, head_dim):
  """(out_specs, out_shape) of the float32 partials m, l [B, K, P, G, 1] and acc [B, K, P, G, H]."""
  shapes = [(batch, kv_heads, num_splits, group, d) for d in (1, 1, head_dim)]
  specs = [pl.BlockSpec((None, None, None, group, d), lambda b, k, s: (b, k, s, 0, 0))
           for d in (1, 1, head_dim)]
  return specs, [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]


# Triton launch parameters when not given: 4 warps, a 2-stage load pipeline
# (each stage holds one K and one V tile in shared memory).
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2
# Quantized (int8) K/V in the ragged kernel: 64-key tiles and a 3-stage
# pipeline were the fastest setting at every swept shape on the H100
# (1.04-1.06x the automatic 128-key, 2-stage choice; docs/benchmarks.md),
# and again with int8 dots (third session: 128 keys / 2 stages / 8 warps and
# 4 stages were slower).
QUANTIZED_TILE_KEYS = 64
QUANTIZED_NUM_STAGES = 3


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps or DEFAULT_NUM_WARPS,
                              num_stages=num_stages or DEFAULT_NUM_STAGES)


def call_gpu_decode(kernel, operands, in_specs, sinks, *, batch: int, kv_heads: int, group: int,
                    head_dim: int, num_splits: int, nonempty, dtype, interpret: bool,
                    num_warps, num_stages, name: str):
  """Run a GPU decode kernel: unsplit (num_splits == 1) or split-K and merged.

  Index maps take (b, k) or (b, k, split). Returns [B, K, G, H] in dtype.
  The query heads are never padded in JAX (the kernels load their G rows
  into a [Gp, H] tile with a mask) and partials / outputs are stored for the
  G real rows only.
  """
  params = triton_params(num_warps, num_stages)
  sink = None if sinks is None else sinks.astype(jnp.float32).reshape(kv_heads, group, 1)
  if num_splits == 1:
    if sink is not None:
      operands = operands + [sink]
      in_specs = in_specs + [pl.BlockSpec((None, group, 1), lambda b, k: (k, 0, 0))]
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, group, head_dim), lambda b, k: (b, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), dtype),
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*operands)  # [B, K, G, H]
  out_specs, out_shape = split_out_specs(batch, kv_heads, num_splits, group, head_dim)
  m, l, acc = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name=name + "_split",
  )(*operands)  # [B, K, P, G, 1] x2, [B, K, P, G, H]
  return combine_splits(m, l, acc, nonempty, sink, dtype)  # [B, K, G, H]
