"""YaRN inverse frequencies against the formula, written out here in float64 NumPy.

The formula is the one of Hugging Face's `_compute_yarn_parameters`: the ramp between
the dimensions where beta_fast and beta_slow rotations fit in the original context,
its ends floored / ceiled only when `truncate` (gpt-oss sets `truncate: false`).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.configs import load_config
from meshattn.layers.rope import RopeSpec, apply_rope, inverse_frequencies
from meshattn.layers.settings import AttentionSettings


def yarn_reference(dim, theta, factor, original, beta_fast, beta_slow, truncate):
  """(inv_freq [dim // 2], cos/sin scale) for `dim` rotated features, in float64."""
  inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)

  def dim_of(rotations):  # the dimension whose wavelength fits `rotations` times in `original`
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  lo, hi = dim_of(beta_fast), dim_of(beta_slow)
  if truncate:
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001
  keep = 1.0 - np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0.0, 1.0)  # 1: extrapolated
  return inv / factor * (1.0 - keep) + inv * keep, 0.1 * math.log(factor) + 1.0


GPT_OSS = dict(head_dim=64, theta=150000.0, factor=32.0, original=4096, fast=32.0, slow=1.0)
CASES = {
  "gpt_oss": (GPT_OSS, 1.0),
  "llama_like": (dict(head_dim=128, theta=10000.0, factor=4.0, original=4096, fast=32.0,
                      slow=1.0), 1.0),
  "partial_rotary": (dict(head_dim=64, theta=500000.0, factor=8.0, original=2048, fast=16.0,
                          slow=2.0), 0.5),
}


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_inverse_frequencies_match_the_formula(case, truncate):
  c, partial = case
  spec = RopeSpec("yarn", max_timescale=c["theta"], partial_rotary_factor=partial,
                  factor=c["factor"], original_max_position_embeddings=c["original"],
                  beta_fast=c["fast"], beta_slow=c["slow"], truncate=truncate)
  got, scale = inverse_frequencies(spec, c["head_dim"])
  want, want_scale = yarn_reference(int(c["head_dim"] * partial), c["theta"], c["factor"],
                                    c["original"], c["fast"], c["slow"], truncate)
  np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
  assert scale == pytest.approx(want_scale, rel=1e-15)


def test_truncation_matters_for_gpt_oss():
  """At gpt-oss's numbers the ramp runs from dimension 8.09 to 17.40: rounding it to 8..18
  moves frequencies 9..17, by up to 76%."""
  args = (GPT_OSS["head_dim"], GPT_OSS["theta"], GPT_OSS["factor"], GPT_OSS["original"],
          GPT_OSS["fast"], GPT_OSS["slow"])
  rounded, exact = yarn_reference(*args, truncate=True)[0], yarn_reference(*args, truncate=False)[0]
  moved = np.nonzero(~np.isclose(rounded, exact, rtol=1e-12, atol=0))[0]
  assert moved.tolist() == list(range(9, 18))
  assert np.max(np.abs(rounded - exact) / exact) > 0.7


def test_gpt_oss_preset_rotates_without_truncation():
  """The preset sets rope_truncate false; the key reaches the layer's RoPE and its output."""
  cfg = load_config("gpt-oss-20b", num_devices=8)
  assert cfg.rope_truncate is False and load_config("base", num_devices=8).rope_truncate is True
  rope = AttentionSettings.from_config(cfg).rope
  assert rope.truncate is False
  want, scale = yarn_reference(*(GPT_OSS[k] for k in ("head_dim", "theta", "factor", "original",
                                                      "fast", "slow")), truncate=False)
  np.testing.assert_allclose(inverse_frequencies(rope, cfg.head_dim)[0], want, rtol=1e-13)
  # apply_rope with those frequencies: rotate-half of x [B, T, heads, H] at positions [B, T]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 2, cfg.head_dim))
  pos = np.array([[0, 1, 7, 100, 300]])  # enough to turn the moved frequencies by ~1 rad
  angles = pos[..., None, None] * want  # [B, T, 1, H/2]
  x1, x2 = x[..., :32], x[..., 32:]
  rotated = np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                            x2 * np.cos(angles) + x1 * np.sin(angles)], axis=-1) * scale
  got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), rope)
  np.testing.assert_allclose(got, rotated, rtol=1e-4, atol=1e-4)
