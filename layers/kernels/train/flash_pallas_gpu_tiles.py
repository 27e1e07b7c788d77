"""Tiles of the Pallas GPU flash kernel (flash_pallas_gpu.py) and the shared memory they need.

Triton keeps every tile a loop loads in shared memory, `num_stages` copies of
it (software pipelining), and the tiles a program loads once (its own rows)
in one copy. A program asking for more than the GPU has per block does not
compile ("Shared memory size limit exceeded"). So the defaults are chosen
per head_dim and dtype, shrunk until they fit, and explicit tiles that
cannot fit are refused before any compilation.

The model (`shared_memory_bytes`), per program, in bytes, T = rows * head_dim * itemsize:
  forward  T(block_q) for q + stages * (T(block_kv) for k and v + their int32 positions and ids)
  dq       T(block_q) for q and do + stages * (k, v tiles and vectors as in the forward)
  dkv      T(block_kv) for k and v + stages * (q, do tiles + positions, ids, lse, delta)
It is an upper bound of what XLA's Triton asked for where it was measured:
the H200 refused dq 128 x 64 tiles at head_dim 256 in bfloat16 with 2 stages
asking for 262656 bytes; the model says 263168. The head_dim 256 defaults
below ran there (docs/benchmarks.md, 2026-12-04); up to head_dim 128 the
bfloat16 defaults are the ones the kernel always had.

This module imports no Pallas code: the registry (registry.py) asks it
whether a request fits without loading the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

# Per block: Hopper (H100 / H200) and Blackwell data-centre parts allow 227 KB,
# the A100 163 KB, consumer Ampere / Ada 99 KB (CUDA programming guide, compute
# capabilities table). Unknown parts get Hopper's.
SHARED_MEMORY_BY_CAPABILITY = {"8.0": 166912, "8.6": 101376, "8.7": 166912, "8.9": 101376,
                               "9.0": 232448, "10.0": 232448, "12.0": 101376}
HOPPER_SHARED_MEMORY = 232448

# Head dims the kernel runs: powers of two (Triton block shapes), from 16 (the
# smallest dot) to 256 (the largest with tiles measured on a GPU).
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
DTYPES = frozenset({"float32", "bfloat16", "float16"})
MIN_BLOCK = 16

_VECTOR_BYTES = 4  # int32 positions / segment ids, float32 lse / delta


@functools.cache
def shared_memory_limit() -> int:
  """Bytes of shared memory per block on the default GPU (Hopper's when there is none)."""
  import jax  # pylint: disable=import-outside-toplevel  # only when a kernel is really built
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:
    return HOPPER_SHARED_MEMORY
  return SHARED_MEMORY_BY_CAPABILITY.get(str(getattr(device, "compute_capability", "")),
                                         HOPPER_SHARED_MEMORY)


def shared_memory_bytes(kernel: str, block_q: int, block_kv: int, head_dim: int, itemsize: int,
                        stages: int) -> int:
  """Shared memory one program of `kernel` ("fwd", "dq" or "dkv") needs (the model above)."""
  tile = lambda rows: rows * head_dim * itemsize
  if kernel == "fwd":
    return tile(block_q) + stages * (2 * tile(block_kv) + 2 * _VECTOR_BYTES * block_kv)
  if kernel == "dq":
    return 2 * tile(block_q) + stages * (2 * tile(block_kv) + 2 * _VECTOR_BYTES * block_kv)
  if kernel == "dkv":
    return 2 * tile(block_kv) + stages * (2 * tile(block_q) + 4 * _VECTOR_BYTES * block_q)
  raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkv', got {kernel!r}")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The kernel's tuning knobs: tiles (powers of two >= 16) and Triton settings.

  block_q / block_kv, num_warps / num_stages: the forward's; block_q_bwd /
  block_kv_bwd: the dq kernel's; block_q_dkv / block_kv_dkv: the dkv
  kernel's; num_warps_bwd / num_stages_bwd: both backward kernels'.
  """

  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int
  block_q_bwd: int
  block_kv_bwd: int
  block_q_dkv: int
  block_kv_dkv: int
  num_warps_bwd: int
  num_stages_bwd: int

  @classmethod
  def get_default(cls, head_dim: int, itemsize: int, limit: int = HOPPER_SHARED_MEMORY) -> Tiles:
    """The defaults for this head_dim and dtype size, shrunk to fit `limit` bytes per block.

    Up to head_dim 128: the H100 sweep's best (b4 s4096 n32 k8 h128 bf16;
    docs/benchmarks.md): forward 64 x 64, 4 warps, 3 stages; dq and dkv 128 x
    64, 2 stages, 8 warps (4 up to head_dim 64). Wider heads: 64 x 64 tiles
    everywhere, 2 stages, 8 warps (the accumulator rows are 256 floats).
    """
    wide = head_dim > 128
    tiles = cls(block_q=64, block_kv=64, num_warps=8 if wide else 4,
                num_stages=2 if wide else 3, block_q_bwd=64 if wide else 128, block_kv_bwd=64,
                block_q_dkv=64 if wide else 128, block_kv_dkv=64,
                num_warps_bwd=4 if head_dim <= 64 else 8, num_stages_bwd=2)
    return tiles.shrunk_to_fit(head_dim, itemsize, limit)

  def shared_memory(self, head_dim: int, itemsize: int) -> dict[str, int]:
    """Bytes per program of each kernel: {"fwd": ..., "dq": ..., "dkv": ...}."""
    return {
        "fwd": shared_memory_bytes("fwd", self.block_q, self.block_kv, head_dim, itemsize,
                                   self.num_stages),
        "dq": shared_memory_bytes("dq", self.block_q_bwd, self.block_kv_bwd, head_dim, itemsize,
                                  self.num_stages_bwd),
        "dkv": shared_memory_bytes("dkv", self.block_q_dkv, self.block_kv_dkv, head_dim, itemsize,
                                   self.num_stages_bwd),
    }

  def shrunk_to_fit(self, head_dim: int, itemsize: int, limit: int) -> Tiles:
    """Fewer stages (not below 2), then halved loop steps, then halved own rows, per kernel,
    until each kernel's tiles fit `limit` (or the tiles reach 16)."""
    tiles = self
    # (kernel, stages field, loop-step field, own-rows field)
    for kernel, stages, step, own in (("fwd", "num_stages", "block_kv", "block_q"),
                                      ("dq", "num_stages_bwd", "block_kv_bwd", "block_q_bwd"),
                                      ("dkv", "num_stages_bwd", "block_q_dkv", "block_kv_dkv")):
      while tiles.shared_memory(head_dim, itemsize)[kernel] > limit:
        for field, floor in ((stages, 2), (step, MIN_BLOCK), (own, MIN_BLOCK)):
          if getattr(tiles, field) > floor:
            value = getattr(tiles, field)
            smaller = value - 1 if field == stages else value // 2
            tiles = dataclasses.replace(tiles, **{field: smaller})
            break
        else:
          return tiles  # nothing left to shrink: `check_fits` names the excess
    return tiles

  def check_fits(self, head_dim: int, itemsize: int, limit: int, *, backward: bool = True):
    """ValueError naming each kernel whose tiles need more than `limit` bytes per block."""
    need = self.shared_memory(head_dim, itemsize)
    over = {k: v for k, v in need.items() if v > limit and (backward or k == "fwd")}
    if over:
      fields = {"fwd": "block_q / block_kv / num_stages",
                "dq": "block_q_bwd / block_kv_bwd / num_stages_bwd",
                "dkv": "block_q_dkv / block_kv_dkv / num_stages_bwd"}
      detail = "; ".join(f"{k} ({fields[k]}) needs {v} bytes" for k, v in over.items())
      raise ValueError(
          f"pallas_gpu_flash_attention tiles exceed the GPU's shared memory per block "
          f"({limit} bytes) at head_dim {head_dim}, {itemsize}-byte inputs: {detail}; use "
          f"smaller tiles or fewer stages (the defaults fit)")


def _check_pow2(name: str, value: int, low: int, high: int | None = None):
  if value < low or value & (value - 1) or (high is not None and value > high):
    raise ValueError(f"{name}={value}: must be a power of two in [{low}, {high or 'inf'}]")


def call_tiles(head_dim: int, itemsize: int, q_len: int, kv_len: int, interpret: bool,
               **given: int | None) -> Tiles:
  """One call's tiles: those given (None: default) over the defaults for this head_dim and
  dtype, validated, shrunk for short inputs, and, when compiled (not interpreted), refused
  with ValueError if they cannot fit the GPU's shared memory."""
  limit = HOPPER_SHARED_MEMORY if interpret else shared_memory_limit()
  for side in ("q", "kv"):  # dkv follows the dq tiles the caller chose
    if given[f"block_{side}_dkv"] is None:
      given[f"block_{side}_dkv"] = given[f"block_{side}_bwd"]
  tiles = dataclasses.replace(Tiles.get_default(head_dim, itemsize, limit),
                              **{k: v for k, v in given.items() if v is not None})
  blocks = {k: v for k, v in dataclasses.asdict(tiles).items() if k.startswith("block_")}
  for name, size in blocks.items():
    _check_pow2(name, size, MIN_BLOCK)
  for name in ("num_warps", "num_warps_bwd"):
    _check_pow2(name, getattr(tiles, name), 1, 32)
  if min(tiles.num_stages, tiles.num_stages_bwd) < 1:
    raise ValueError(f"num_stages={tiles.num_stages} / num_stages_bwd={tiles.num_stages_bwd}: "
                     "must be >= 1")
  # Short inputs: shrink the tiles (still powers of two) rather than pad a lot.
  pow2 = lambda n: 1 << max(n - 1, 0).bit_length()
  tiles = dataclasses.replace(tiles, **{
      name: min(size, max(MIN_BLOCK, pow2(kv_len if name.startswith("block_kv") else q_len)))
      for name, size in blocks.items()})
  if not interpret:
    tiles.check_fits(head_dim, itemsize, limit)
  return tiles


def unsupported(head_dim: int | None, dtype: str | None, backward: bool,
                limit: int = HOPPER_SHARED_MEMORY) -> str | None:
  """Why the kernel cannot run this head_dim / dtype (None: it can), for the registry."""
  if head_dim is not None and not (
      MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0):
    return (f"head_dim {head_dim}: needs a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] "
            f"(Triton block shapes; wider heads have no tiles measured)")
  if dtype is not None and dtype not in DTYPES:
    return f"dtype {dtype}: runs {sorted(DTYPES)}"
  if head_dim is None:
    return None
  itemsize = 4 if dtype == "float32" else 2
  try:
    Tiles.get_default(head_dim, itemsize, limit).check_fits(head_dim, itemsize, limit,
                                                            backward=backward)
  except ValueError as error:
    return str(error)
  return None
