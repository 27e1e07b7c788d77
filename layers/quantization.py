"""Quantized projections: config `quantization` (MaxText's key) -> the dot_general the
q/k/v and output projections run.

"int8": AQT (aqtp) int8 x int8 -> int32 matmuls in the forward pass. Both
operands are quantized symmetrically against their absolute maximum over
the contracted axes (127.5 steps, round to nearest): the activations per
token, the kernels per output feature. The backward pass is not quantized:
it differentiates the quantized forward (straight-through the rounding) in
the compute dtype, so training is deterministic and needs no RNG stream.
The parameters stay in weight_dtype; only the matmuls change, so a
checkpoint moves freely between quantized and unquantized layers.
"""

from __future__ import annotations

from meshattn.configs.vocabulary import QUANTIZATION_MODES
from meshattn.layers.projections import DotGeneral


def check_quantization(mode: str) -> None:
  if mode not in QUANTIZATION_MODES:
    raise ValueError(f"quantization={mode!r}: allowed {list(QUANTIZATION_MODES)} ('' = none)")


def projection_dot_general(mode: str) -> DotGeneral | None:
  """The projections' dot_general for `mode` (None: jax.lax.dot_general)."""
  check_quantization(mode)
  if not mode:
    return None
  # Imported here: aqtp is only needed when quantization is on.
  from aqt.jax.v2 import config as aqt_config
  return aqt_config.fully_quantized(fwd_bits=8, bwd_bits=None, use_stochastic_rounding=False)
