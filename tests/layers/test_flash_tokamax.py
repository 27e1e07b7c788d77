"""tokamax's Mosaic GPU kernel (a `flash` variant) against the float32 reference.

Runs only where tokamax is installed and its kernel runs (Hopper+ GPU); on
the CPU suite every case skips and the refusals are covered by
test_registry.py. Same calibrated bound as the cuDNN tests: at most twice the
error of the reference kernel itself run in bfloat16 with float32 logits,
plus one bf16 ulp.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.kernel_checks import rel_err, values_and_grads
from meshattn.layers import KernelOptions, MaskSpec, dot_product_attention
from meshattn.configs.vocabulary import MASK_FEATURE
from meshattn.layers.kernels import registry
from meshattn.layers.kernels.train.flash_tokamax import (TOKAMAX_LENGTH_MULTIPLE,
                                                         tokamax_attention, tokamax_available)

B, N, H = 2, 4, 64

# (id, kv heads, MaskSpec, soft cap, length). Lengths that are not a multiple of 128 are
# not tokamax's (TOKAMAX_LIMITS): the registry's `flash` choice for them is checked instead
# (cuDNN, or the Pallas kernel for soft cap).
CASES = [
    ("mha-causal", 4, MaskSpec("global"), None, 256),
    ("gqa-causal-softcap", 2, MaskSpec("global"), 30.0, 256),
    ("mqa-window", 1, MaskSpec("local_sliding", window=40), None, 256),
    ("gqa-window-softcap", 2, MaskSpec("local_sliding", window=100), 20.0, 256),
    ("gqa-full", 2, MaskSpec("full"), None, 256),
    ("gqa-softcap-t100-fallback", 2, MaskSpec("global"), 30.0, 100),
    ("gqa-window-t200-fallback", 2, MaskSpec("local_sliding", window=37), None, 200),
]


@pytest.mark.skipif(not tokamax_available(), reason="needs tokamax and a Hopper+ GPU")
@pytest.mark.parametrize("kv_heads,spec,soft_cap,T", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_tokamax_matches_reference(kv_heads, spec, soft_cap, T):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.bfloat16)  # [B, T, N, H]
  k = jnp.asarray(rng.normal(size=(B, T, kv_heads, H)), jnp.bfloat16)  # [B, S, K, H]
  v = jnp.asarray(rng.normal(size=(B, T, kv_heads, H)), jnp.bfloat16)  # [B, S, K, H]
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)  # [B, T, N, H]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))  # [B, T]
  options = KernelOptions(mask=spec, scale=H**-0.5, soft_cap=soft_cap)
  kwargs = dict(q_positions=pos, kv_positions=pos)

  kernel = tokamax_attention
  if T % TOKAMAX_LENGTH_MULTIPLE:
    features = {MASK_FEATURE[spec.attention_type], "gqa", "backward"} | (
        {"soft_cap"} if soft_cap else set())
    chosen = registry.select("flash", registry.Request(
        "gpu", "train", frozenset(features), head_dim=H, dtype="bfloat16", q_len=T, kv_len=T))
    assert chosen.description != "tokamax Mosaic GPU", chosen
    kernel = chosen.load()
  got, got_grads = values_and_grads(kernel, q, k, v, cot, options=options, **kwargs)
  f32 = lambda x: x.astype(jnp.float32)
  want, want_grads = values_and_grads(dot_product_attention, f32(q), f32(k), f32(v), f32(cot),
                                      options=options, **kwargs)
  bf16_options = dataclasses.replace(options, float32_qk_product=True, float32_logits=True)
  ref, ref_grads = values_and_grads(dot_product_attention, q, k, v, cot, options=bf16_options,
                                    **kwargs)
  ulp = 2.0**-8
  err, bound = rel_err(got, want), 2 * rel_err(ref, want) + ulp
  assert err < bound, (err, bound)
  for name, g, w, r in zip(["dq", "dk", "dv"], got_grads, want_grads, ref_grads):
    err, bound = rel_err(g, w), 2 * rel_err(r, w) + ulp
    assert err < bound, (name, err, bound)


@pytest.mark.skipif(not tokamax_available(), reason="needs tokamax and a Hopper+ GPU")
def test_layer_with_soft_cap_uses_tokamax_on_gpu():
  """The layer's flash request with a soft cap lands on tokamax (cuDNN cannot express it)."""
  kernel = registry.select("flash", registry.Request(
      "gpu", "train", frozenset({"causal", "gqa", "soft_cap", "backward"})))
  assert kernel.description == "tokamax Mosaic GPU"
  assert jax.default_backend() == "gpu"
