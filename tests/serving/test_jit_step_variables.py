"""jit_step moves Variables as nnx.split / nnx.merge do: hooks run once, refs stay refs."""

import jax.numpy as jnp
import pytest
from flax import nnx

from meshattn.layers.serving import jit_step


class Hooked(nnx.Module):
  def __init__(self, ref: bool):
    self.w = nnx.Param(jnp.ones(3), on_get_value=lambda var, x: x * 2)
    self.c = nnx.Cache(jnp.zeros(3), on_set_value=lambda var, x: x + 100)
    self.r = nnx.Cache(jnp.zeros(3), ref=ref)

  def __call__(self):
    self.c[...] = self.c[...] + 1
    self.r[...] = self.r[...] + 1
    return self.w[...]


@pytest.mark.parametrize("ref", [False, True])
def test_hooks_run_once_and_refs_stay_refs_as_under_nnx_jit(ref):
  results = {}
  for name, run in (("eager", lambda m: m()), ("nnx.jit", nnx.jit(lambda m: m())),
                    ("jit_step", jit_step(lambda m: m())),
                    ("jit_step, no donation", jit_step(lambda m: m(), donate=False))):
    module = Hooked(ref)
    out = run(module)
    run(module)  # a second call sees the first's writes
    results[name] = (float(out[0]), float(module.c.get_raw_value()[0]),
                     float(module.r.get_value()[0]), type(module.r.get_raw_value()).__name__)
  assert results["eager"][:3] == (2.0, 202.0, 2.0)  # (0 + 1 + 100) + 1 + 100
  assert all(r == results["eager"] for r in results.values()), results
