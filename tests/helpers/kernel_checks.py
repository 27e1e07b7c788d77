"""Shared by the kernel tests: relative error and one-jit values + gradients."""

from __future__ import annotations

import jax
import numpy as np


def rel_err(got, want) -> float:
  """Largest absolute difference relative to the largest magnitude of `want`."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def values_and_grads(kernel, q, k, v, cot, *, sinks=None, **kwargs):
  """(context, (dq, dk, dv[, dsinks])) of sum(context * cot), in one jit."""

  def run(q, k, v, cot, sinks):
    def attend(q, k, v, sinks):
      return kernel(q, k, v, sinks=sinks, **kwargs)[0]  # [B, T, N, H]

    context, vjp = jax.vjp(attend, q, k, v, sinks)
    grads = vjp(cot)
    return context, grads if sinks is not None else grads[:3]

  return jax.jit(run)(q, k, v, cot, sinks)
