"""Decode kernels called directly on arrays (scripts, benchmarks, tests), the registry choosing.

The layer reaches the decode kernels through kernels/dispatch.py with its cache's view;
code that holds the arrays itself calls `ragged_decode` / `paged_decode`, which build the
same registry request from the arrays and run the implementation it picks (each kernel
module registers its own variants). Both read only each sequence's valid keys: row b
attends over cache entries [0, lengths[b]).

implementation: "auto" (what the registry picks on this host), "pallas" (the best Pallas
variant: GPU, or TPU on a TPU host) or "reference"; `interpret` runs the TPU Pallas kernels
in interpret mode on this host.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.layers.kernels import registry
from meshattn.layers.kernels.decode import paged as paged_kernels
from meshattn.layers.kernels.decode import ragged as ragged_kernels


def _implementation(name: str, implementation: str, interpret: bool, query, key, key_scale, *,
                    kv_len: int, window=None, soft_cap=None, sinks=None) -> Callable:
  """The function of `name`'s implementation that serves these arrays."""
  if implementation == "reference" and not interpret:
    return {"ragged": ragged_kernels.ragged_decode_reference,
            "paged": paged_kernels.paged_decode_reference}[name]
  here = registry.current_platform()
  platform = "tpu" if interpret or here == "tpu" else here if implementation == "auto" else "gpu"
  kv_heads = key.shape[2]
  flags = {"gqa": query.shape[1] != kv_heads, "window": window is not None,
           "soft_cap": soft_cap is not None, "sinks": sinks is not None,
           "quantized_kv": key_scale is not None, "paged_kv": name == "paged",
           "float32": jnp.dtype(query.dtype) == jnp.float32}
  scale_heads = None if key_scale is None else key_scale.shape[1 if name == "ragged" else 2]
  request = registry.Request(
      platform, "autoregressive", frozenset({"causal"} | {f for f, on in flags.items() if on}),
      head_dim=query.shape[-1], dtype=query.dtype, kv_len=kv_len, kv_dtype=key.dtype,
      kv_quant_axis=None if scale_heads is None else "dkv" if scale_heads == kv_heads
      else "heads_and_dkv", group=query.shape[1] // kv_heads)
  variants = [k for k in registry.kernels(name) if platform in k.platforms]
  if implementation == "pallas":  # the Pallas variants only, each refusing what it cannot read
    variants = [k for k in variants if not k.impl.endswith("_reference")]
    ordered = sorted(variants, key=lambda k: -k.rank_for(request))
    kernel = next((k for k in ordered if k.serves(request)), ordered[0])
  else:
    kernel = registry.select(name, request)
  fn = kernel.load()
  return functools.partial(fn, interpret=True) if interpret and kernel.interpretable else fn


def ragged_decode(query, key, value, lengths, *, scale, soft_cap=None, window=None, sinks=None,
                  key_scale=None, value_scale=None, implementation: str = "auto",
                  interpret: bool = False) -> jax.Array:
  """query [B, N, H] over key/value [B, S, K, H] entries [0, lengths[b]) -> [B, N, H]."""
  fn = _implementation("ragged", implementation, interpret, query, key, key_scale,
                       kv_len=key.shape[1], window=window, soft_cap=soft_cap, sinks=sinks)
  return fn(query, key, value, lengths, scale=scale, soft_cap=soft_cap, window=window,
            sinks=sinks, key_scale=key_scale, value_scale=value_scale)


def paged_decode(query, key_pages, value_pages, page_table, lengths, *, page_owner, slots, scale,
                 soft_cap=None, sinks=None, key_scale=None, value_scale=None,
                 implementation: str = "auto", interpret: bool = False) -> jax.Array:
  """query [B, N, H] over the pages of each row's page_table [B, maxp] -> [B, N, H].

  Row b reads only pages its slot slots[b] owns per page_owner [P] (see paged.py), on every
  implementation.
  """
  fn = _implementation("paged", implementation, interpret, query, key_pages, key_scale,
                       kv_len=page_table.shape[1] * key_pages.shape[1], soft_cap=soft_cap,
                       sinks=sinks)
  return fn(query, key_pages, value_pages, page_table, lengths, page_owner=page_owner,
            slots=slots, scale=scale, soft_cap=soft_cap, sinks=sinks, key_scale=key_scale,
            value_scale=value_scale)
