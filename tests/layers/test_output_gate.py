"""The output gate (Gated Attention, attnax's LITE): module against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from meshattn.layers.output_gate import OutputGate


@pytest.mark.parametrize("kind", ["elementwise", "headwise"])
def test_gate_matches_numpy(kind):
  gate = OutputGate(6, 4, 3, kind=kind, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)  # [B, T, D]
  context = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)  # [B, T, N, H]
  w = np.asarray(gate.kernel[...], np.float64)  # [D, N, H] or [D, N]
  logits = np.einsum("btd,d...->bt...", x.astype(np.float64), w)
  weights = 1 / (1 + np.exp(-logits))
  want = context * (weights if kind == "elementwise" else weights[..., None])
  np.testing.assert_allclose(np.asarray(gate(x, context)), want, rtol=1e-5, atol=1e-6)
  assert gate.kernel.logical_axes == ("embed", "q_heads", "kv_head_dim")[:w.ndim]


def test_gate_kind_is_checked():
  with pytest.raises(ValueError, match="attention_output_gate='sigmoid'"):
    OutputGate(6, 4, 3, kind="sigmoid", rngs=nnx.Rngs(0))
