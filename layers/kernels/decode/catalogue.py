"""The decode implementations, registered one row each with where they run and their rank.

`ragged` (a contiguous cache) and `paged` (a page pool) are the names a config uses
(`decode_attention`); each has several concrete implementations, tried best first:

  ragged  Mosaic GPU int8 (rank 2)   H200, an int8 cache with per-head scales at head_dim 128
          Triton (rank 1)            GPU
          Mosaic TPU (rank 1)        TPU (and interpret mode), no int4
          JAX reference (rank 0)     CPU; on GPU / TPU where no Pallas kernel reads the cache
  paged   Triton / Mosaic TPU / JAX reference, as ragged (neither Pallas kernel reads int4)

Pure Python: nothing here imports Pallas; the kernels are loaded on first use.
"""

from __future__ import annotations

from meshattn.layers.kernels.registry import (
    ALL, PAGED_FEATURES, RAGGED_FEATURES, TRITON_DECODE_LIMITS, Kernel, Limits, Request, register)

_D = "meshattn.layers.kernels.decode"
_MODE = frozenset({"autoregressive"})
_GPU, _TPU = frozenset({"gpu"}), frozenset({"tpu"})
_HALF = frozenset({"bfloat16", "float16"})


def _no_int4(request: Request) -> str | None:
  # The TPU kernels and the paged GPU kernel have no sub-byte load.
  return "an int4 cache (no sub-byte load)" if request.kv_dtype == "int4" else None


def _mgpu_fits(request: Request) -> str | None:
  # pylint: disable-next=import-outside-toplevel
  from meshattn.layers.kernels.decode import decode_int8_mgpu as mgpu
  if request.kv_dtype != "int8" or request.kv_quant_axis != "dkv":
    return "needs an int8 cache with per-head scales (kv_quant_axis dkv)"
  if request.group is not None and request.group > mgpu.PADDED_GROUP:
    return f"{request.group} query heads per kv head (at most {mgpu.PADDED_GROUP})"
  if request.kv_len is not None and request.kv_len % mgpu.BLOCK_KV:
    return f"cache length {request.kv_len} not a multiple of {mgpu.BLOCK_KV}"
  return None


def _mgpu_measured_faster() -> bool:
  # pylint: disable-next=import-outside-toplevel
  from meshattn.layers.kernels.decode import decode_int8_mgpu as mgpu
  return mgpu.measured_faster_here()


# On the H200 an int8 cache in its scope runs 1.45-1.54x the Triton int8 kernel's speed at
# full and uniformly ragged lengths, 1.03x on a skewed, latency-bound batch
# (docs/benchmarks.md, 2026-11-30 second entry); other Hopper parts until measured: Triton.
register(Kernel("ragged", _GPU, _MODE, frozenset({"gqa", "causal", "sinks", "quantized_kv"}),
                f"{_D}.decode_int8_mgpu:ragged_int8_decode", "Mosaic GPU int8 (H200)",
                available=_mgpu_measured_faster, requires=frozenset({"quantized_kv"}),
                rank=lambda request: 2, protocol="decode",
                limits=Limits(_GPU, min_head_dim=128, max_head_dim=128, dtypes=_HALF,
                              fits=_mgpu_fits, why="measured at head_dim 128, 64-token tiles")))
register(Kernel("ragged", _GPU, _MODE, RAGGED_FEATURES, f"{_D}.ragged:ragged_decode_pallas",
                "Triton (GPU)", rank=lambda request: 1, protocol="decode",
                bind=(("backend", "gpu"),), limits=TRITON_DECODE_LIMITS))
register(Kernel("ragged", _TPU, _MODE, RAGGED_FEATURES, f"{_D}.ragged:ragged_decode_pallas",
                "Mosaic TPU", rank=lambda request: 1, protocol="decode", interpretable=True,
                bind=(("backend", "tpu"),), limits=Limits(_TPU, fits=_no_int4)))
# The reference ranks last: on GPU / TPU it serves what no Pallas variant reads (int4 pages,
# int4 on TPU), under the GPU kernels' head_dim limits, as `ragged` / `paged` always did.
register(Kernel("ragged", ALL, _MODE, RAGGED_FEATURES, f"{_D}.ragged:ragged_decode_reference",
                "JAX reference", protocol="decode", limits=TRITON_DECODE_LIMITS))
_PAGED = frozenset({"paged_kv"})
register(Kernel("paged", _GPU, _MODE, PAGED_FEATURES, f"{_D}.paged:paged_decode_pallas",
                "Triton (GPU)", requires=_PAGED, rank=lambda request: 1, protocol="decode",
                bind=(("backend", "gpu"),),
                limits=Limits(_GPU, min_head_dim=16, head_dim_power_of_two=True, fits=_no_int4,
                              why=TRITON_DECODE_LIMITS.why + "; no int4 load")))
register(Kernel("paged", _TPU, _MODE, PAGED_FEATURES, f"{_D}.paged:paged_decode_pallas",
                "Mosaic TPU", requires=_PAGED, rank=lambda request: 1, protocol="decode",
                interpretable=True, bind=(("backend", "tpu"),), limits=Limits(_TPU, fits=_no_int4)))
register(Kernel("paged", ALL, _MODE, PAGED_FEATURES, f"{_D}.paged:paged_decode_reference",
                "JAX reference", requires=_PAGED, protocol="decode", limits=TRITON_DECODE_LIMITS))
