"""Decode-kernel entry points for the registry: pick the Pallas kernel where it
runs (GPU Triton, TPU Mosaic) and the pure-JAX reference elsewhere.

Both read only each sequence's valid keys: row b attends over cache entries
[0, lengths[b]) (after the step's token has been written).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.decode import decode_int8_mgpu
from meshattn.layers.kernels.decode import paged as paged_kernels
from meshattn.layers.kernels.decode import ragged as ragged_kernels


def choose_implementation(implementation: str, interpret: bool, key_dtype, *,
                          paged: bool) -> tuple[str, str]:
  """(implementation, pallas backend) for this host.

  "auto": the Pallas kernel on GPU and TPU, the reference elsewhere. int4
  K/V: only the ragged GPU kernel reads them (6-11x the reference on the
  H100, docs/benchmarks.md); the paged and TPU kernels have no sub-byte
  load, so int4 there runs the reference.
  """
  platform = jax.default_backend()
  if interpret:
    return "pallas", "tpu"
  if implementation == "auto":
    int4_ok = platform == "gpu" and not paged
    pallas_ok = platform in ("gpu", "tpu") and (jnp.dtype(key_dtype) != jnp.int4 or int4_ok)
    implementation = "pallas" if pallas_ok else "reference"
  return implementation, "tpu" if platform == "tpu" else "gpu"


def ragged_decode(query, key, value, lengths, *, scale, soft_cap=None, window=None, sinks=None,
                  key_scale=None, value_scale=None, implementation: str = "auto",
                  interpret: bool = False) -> jax.Array:
  """query [B, N, H] over key/value [B, S, K, H] entries [0, lengths[b]) -> [B, N, H].

  On the H200, an int8 cache within its scope goes to the Mosaic GPU kernel
  (decode_int8_mgpu.serves: 1.45-1.54x the Triton int8 kernel's speed at
  full and uniformly ragged lengths, 1.03x on a skewed, latency-bound batch;
  docs/benchmarks.md, 2026-11-30 second entry); everything else, and other
  Hopper parts until measured, to the Triton one.
  """
  impl, backend = choose_implementation(implementation, interpret, key.dtype, paged=False)
  kwargs = dict(scale=scale, soft_cap=soft_cap, window=window, sinks=sinks, key_scale=key_scale,
                value_scale=value_scale)
  if impl == "reference":
    return ragged_kernels.ragged_decode_reference(query, key, value, lengths, **kwargs)
  if backend == "gpu" and not interpret and decode_int8_mgpu.serves(
      query, key, value, lengths, key_scale, value_scale, sinks, soft_cap=soft_cap,
      window=window):
    return decode_int8_mgpu.int8_decode_mgpu(query, key, value, lengths, key_scale, value_scale,
                                             scale=scale, sinks=sinks)
  return ragged_kernels.ragged_decode_pallas(query, key, value, lengths, interpret=interpret,
                                             backend=backend, **kwargs)


def paged_decode(query, key_pages, value_pages, page_table, lengths, *, page_owner, slots, scale,
                 soft_cap=None, sinks=None, key_scale=None, value_scale=None,
                 implementation: str = "auto", interpret: bool = False) -> jax.Array:
  """query [B, N, H] over the pages of each row's page_table [B, maxp] -> [B, N, H].

  Row b reads only pages its slot slots[b] owns per page_owner [P] (see paged.py), on every
  implementation.
  """
  impl, backend = choose_implementation(implementation, interpret, key_pages.dtype, paged=True)
  kwargs = dict(page_owner=page_owner, slots=slots, scale=scale, soft_cap=soft_cap, sinks=sinks,
                key_scale=key_scale, value_scale=value_scale)
  if impl == "reference":
    return paged_kernels.paged_decode_reference(query, key_pages, value_pages, page_table, lengths,
                                                **kwargs)
  return paged_kernels.paged_decode_pallas(query, key_pages, value_pages, page_table, lengths,
                                           interpret=interpret, backend=backend, **kwargs)
