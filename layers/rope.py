"""Rotary position embeddings: default, Llama 3.1 scaling, YaRN, partial rotary, MRoPE.

Convention: "rotate half". The rotated part of a head (its leading
`rotary_dim` features) is split into halves x1, x2 and becomes
(x1*cos - x2*sin, x2*cos + x1*sin); the remaining features pass through
(partial rotary). Frequencies are computed in float32 from the positions the
caller gives, so packed sequences whose positions restart at 0 rotate exactly
like separate sequences.

MRoPE (Qwen2-VL's multimodal RoPE, `mrope_section`): positions come as
several streams [n, B, T] (temporal, height, width) and frequency i of the
rotated half rotates by the stream of the section it falls in: with
sections (16, 24, 24), frequencies 0-15 follow the temporal positions, 16-39
the heights and 40-63 the widths. Text tokens, whose streams are equal, may
pass plain [B, T] positions: that is the same rotation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.configs.validation import check_values
from meshattn.configs.vocabulary import ROPE_CONFIG_KEYS, rope_problem
from meshattn.configs.vocabulary import ROPE_TYPES  # noqa: F401  (re-exported)

RopeType = Literal["default", "llama3.1", "yarn", "none"]


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Everything RoPE needs; `rope_type='none'` turns it off."""

  rope_type: RopeType = "default"
  min_timescale: float = 1.0
  max_timescale: float = 10_000.0  # theta
  partial_rotary_factor: float = 1.0
  factor: float = 8.0  # llama3.1 / yarn context extension
  low_freq_factor: float = 1.0  # llama3.1
  high_freq_factor: float = 4.0  # llama3.1
  original_max_position_embeddings: int = 8192  # llama3.1 / yarn
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  # yarn: round the ramp's ends to whole dimensions (floor / ceil), as the YaRN paper's code
  # does; False keeps them fractional (gpt-oss: HF rope_scaling `truncate: false`).
  truncate: bool = True
  attention_factor: float = 0.0  # yarn cos/sin scale; 0 -> 0.1*ln(factor)+1
  # MRoPE: frequencies per position stream, summing to rotary_dim // 2; () = off.
  mrope_section: tuple[int, ...] = ()

  def __post_init__(self):
    check_values(((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)), "RopeSpec")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r}: allowed {ROPE_TYPES}")
    sections = tuple(self.mrope_section)
    if sections and (self.rope_type == "none" or any(
        isinstance(n, bool) or not float(n).is_integer() or n < 1 for n in sections)):
      raise ValueError(f"mrope_section={sections}: positive integers, with RoPE on")
    object.__setattr__(self, "mrope_section", tuple(int(n) for n in sections))  # hashable
    if not 0.0 < self.partial_rotary_factor <= 1.0:
      raise ValueError(
          f"partial_rotary_factor={self.partial_rotary_factor}: allowed (0, 1]")
    # The timescale and scaling rules the config checks too (vocabulary.rope_problem).
    problem = rope_problem(self.rope_type, {f: getattr(self, f) for f in ROPE_CONFIG_KEYS})
    if problem:
      field, message = problem
      raise ValueError(f"RopeSpec {field}={getattr(self, field)!r}: {message}")

  @property
  def enabled(self) -> bool:
    return self.rope_type != "none"

  def check(self, head_dim: int) -> None:
    """Raise unless this RoPE fits heads of head_dim (even rotated width; MRoPE sections that
    cover its frequencies)."""
    if not self.enabled:
      return
    half = self.rotary_dim(head_dim) // 2
    if self.mrope_section and sum(self.mrope_section) != half:
      raise ValueError(f"mrope_section={self.mrope_section} sums to {sum(self.mrope_section)}; "
                       f"it must cover the {half} rotated frequencies (rotary_dim // 2)")

  def rotary_dim(self, head_dim: int) -> int:
    dim = int(head_dim * self.partial_rotary_factor)
    if dim <= 0 or dim % 2:
      raise ValueError(
          f"RoPE rotates int(head_dim * partial_rotary_factor) = {dim} features "
          f"(head_dim={head_dim}, partial_rotary_factor={self.partial_rotary_factor}); "
          "it must be even and > 0")
    return dim


def _timescales(spec: RopeSpec, rotary_dim: int) -> np.ndarray:
  """Per-frequency timescales [rotary_dim // 2], geometric from min to max."""
  fraction = 2.0 * np.arange(rotary_dim // 2, dtype=np.float64) / rotary_dim
  return spec.min_timescale * (spec.max_timescale / spec.min_timescale) ** fraction


def _llama31_inv_freq(spec: RopeSpec, inv_freq: np.ndarray) -> np.ndarray:
  """Llama 3.1: keep short wavelengths, divide long ones by `factor`, blend between."""
  old_len = spec.original_max_position_embeddings
  wavelen = 2.0 * math.pi / inv_freq
  low_freq_wavelen = old_len / spec.low_freq_factor
  high_freq_wavelen = old_len / spec.high_freq_factor
  band = spec.high_freq_factor - spec.low_freq_factor
  # low == high (Llama 4): no band between the two cut-offs, nothing is blended.
  smooth = (old_len / wavelen - spec.low_freq_factor) / band if band else np.zeros_like(wavelen)
  blended = (1.0 - smooth) * inv_freq / spec.factor + smooth * inv_freq
  return np.where(
      wavelen < high_freq_wavelen, inv_freq,
      np.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, blended))


def _yarn_inv_freq(spec: RopeSpec, timescale: np.ndarray, rotary_dim: int) -> np.ndarray:
  """YaRN: dimensions that rotate often over the original context are kept
  (extrapolated), slow ones are interpolated by `factor`, a linear ramp in
  dimension index between `beta_fast` and `beta_slow` rotations (its ends
  rounded outwards to whole dimensions when `truncate`)."""
  base = spec.max_timescale / spec.min_timescale
  old_len = spec.original_max_position_embeddings

  def correction_dim(num_rotations: float) -> float:
    return rotary_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
  if spec.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(rotary_dim // 2) - low) / (high - low), 0.0, 1.0)
  extrapolate = 1.0 - ramp  # 1 for fast dimensions, 0 for slow ones
  inv_freq = 1.0 / timescale
  return inv_freq / spec.factor * (1.0 - extrapolate) + inv_freq * extrapolate


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> tuple[np.ndarray, float]:
  """(inv_freq [rotary_dim // 2] float64, cos/sin scale) for the spec."""
  rotary_dim = spec.rotary_dim(head_dim)
  timescale = _timescales(spec, rotary_dim)
  inv_freq = 1.0 / timescale
  scale = 1.0
  if spec.rope_type == "llama3.1":
    inv_freq = _llama31_inv_freq(spec, inv_freq)
  elif spec.rope_type == "yarn":
    inv_freq = _yarn_inv_freq(spec, timescale, rotary_dim)
    scale = spec.attention_factor or (0.1 * math.log(spec.factor) + 1.0)
  return inv_freq, scale


def frequency_positions(positions: jax.Array, spec: RopeSpec, num_freqs: int) -> jax.Array:
  """Each frequency's positions [B, T, R/2] from positions [B, T] (one stream) or, with
  MRoPE, [n, B, T] (stream j drives the frequencies of section j)."""
  positions = positions.astype(jnp.float32)
  if positions.ndim == 2:
    return jnp.broadcast_to(positions[..., None], positions.shape + (num_freqs,))
  sections = spec.mrope_section
  if positions.ndim != 3 or not sections or positions.shape[0] != len(sections):
    raise ValueError(f"positions of shape {positions.shape}: expected [batch, length]"
                     + (f" or [{len(sections)}, batch, length] (mrope_section={sections})"
                        if sections else " (MRoPE streams need mrope_section)"))
  stream = np.repeat(np.arange(len(sections)), sections)  # [R/2] stream of each frequency
  return jnp.moveaxis(positions[stream], 0, -1)  # [B, T, R/2]


def apply_rope(x: jax.Array, positions: jax.Array, spec: RopeSpec) -> jax.Array:
  """Rotate x [B, T, heads, H] by positions [B, T] (or MRoPE streams [n, B, T]); identity when
  RoPE is off."""
  if not spec.enabled:
    return x
  head_dim = x.shape[-1]
  rotary_dim = spec.rotary_dim(head_dim)
  inv_freq, scale = inverse_frequencies(spec, head_dim)
  pos = frequency_positions(positions, spec, rotary_dim // 2)  # [B, T, R/2]
  angles = pos * jnp.asarray(inv_freq, jnp.float32)  # [B, T, R/2]
  cos = (jnp.cos(angles) * scale)[:, :, None, :]  # [B, T, 1, R/2]
  sin = (jnp.sin(angles) * scale)[:, :, None, :]  # [B, T, 1, R/2]
  xf = x.astype(jnp.float32)
  half = rotary_dim // 2
  x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]  # [B, T, heads, R/2]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)  # [B, T, heads, H]
  return rotated.astype(x.dtype)
