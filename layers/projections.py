"""Projections and norms whose parameters carry logical axis names.

Each parameter is an `nnx.Param` with `logical_axes` metadata (one logical
name per dimension); `meshattn.sharding.get_param_shardings` turns those into
shardings through the logical axis rules, so the layer itself never names a
mesh axis.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.configs.vocabulary import QK_NORM_TYPES  # noqa: F401  (re-exported)
from meshattn.kvcache.graph_epoch import TracksGraph

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
# jax.lax.dot_general's signature: (lhs, rhs, dimension_numbers, precision=None,
# preferred_element_type=None) -> array. Quantized matmuls (AQT's DotGeneral,
# `meshattn.layers.quantization`) plug in here.
DotGeneral = Callable[..., jax.Array]
default_kernel_init: Initializer = nnx.initializers.lecun_normal()
default_bias_init: Initializer = nnx.initializers.zeros_init()


def _init_flat(init: Initializer, key, in_shape, out_shape, dtype) -> jax.Array:
  """Initialise a [*in, *out] kernel as a 2-D [prod(in), prod(out)] matrix so
  fan-in based initialisers see the true fan-in (as Flax's DenseGeneral does)."""
  flat = init(key, (math.prod(in_shape), math.prod(out_shape)), dtype)
  return flat.reshape(tuple(in_shape) + tuple(out_shape))


class DenseGeneral(TracksGraph, nnx.Module):
  """y[..., *out] = sum over the last len(in_shape) axes of x[..., *in] * kernel[*in, *out].

  dot_general (default jax.lax.dot_general) computes that contraction; a
  replacement with the same signature (Flax's `qkv_dot_general` hook) can
  quantize it.
  """

  def __init__(
      self,
      in_shape: Sequence[int],
      out_shape: Sequence[int],
      *,
      kernel_axes: Sequence[str | None],
      rngs: nnx.Rngs,
      use_bias: bool = False,
      bias_axes: Sequence[str | None] | None = None,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      dtype: jnp.dtype | None = None,
      weight_dtype: jnp.dtype = jnp.float32,
      precision: jax.lax.Precision | None = None,
      dot_general: DotGeneral | None = None,
  ):
    self.in_shape = tuple(in_shape)
    self.out_shape = tuple(out_shape)
    if len(kernel_axes) != len(self.in_shape) + len(self.out_shape):
      raise ValueError(f"kernel_axes {kernel_axes} must name every kernel dimension")
    self.dtype = dtype
    self.precision = precision
    self.dot_general = dot_general or jax.lax.dot_general
    self.dot_general_name: str | None = None  # set by use_dot_general_module
    kernel = _init_flat(kernel_init, rngs.params(), self.in_shape, self.out_shape, weight_dtype)
    self.kernel = nnx.Param(kernel, logical_axes=tuple(kernel_axes))
    if use_bias:
      bias = bias_init(rngs.params(), self.out_shape, weight_dtype)
      axes = tuple(bias_axes) if bias_axes is not None else (None,) * len(self.out_shape)
      self.bias = nnx.Param(bias, logical_axes=axes)
    else:
      self.bias = None

  def use_dot_general_module(self, name: str, module: nnx.Module) -> None:
    """Contract with `module`, a stateful op kept as attribute `name` so that its variables
    sit under this projection (as a Linen `dot_general_cls` op's do in Flax's tree)."""
    setattr(self, name, module)
    self.dot_general_name = name

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if x.shape[-n_in:] != self.in_shape:
      raise ValueError(f"input feature shape {x.shape[-n_in:]} != expected {self.in_shape}")
    dtype = self.dtype or jnp.result_type(x, self.kernel[...])
    kernel = self.kernel[...].astype(dtype)
    x = jnp.asarray(x, dtype)  # also a NumPy input (AQT takes jax arrays only)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    dot_general = (self.dot_general if self.dot_general_name is None
                   else getattr(self, self.dot_general_name))
    y = dot_general(x, kernel, (contract, ((), ())), precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def _norm_dtype(x: jax.Array):
  """Norms run in float32 at least: a float64 model keeps float64 (as Flax's norms do)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _rms_normalize(x: jax.Array, epsilon: float) -> jax.Array:
  """x / sqrt(mean(x^2) + epsilon) over the last axis, in float32 or wider."""
  xf = x.astype(_norm_dtype(x))
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)


class _ScaledNorm(TracksGraph, nnx.Module):
  """A norm over the last axis with a learned scale [features] (named by `scale_axes`)."""

  def __init__(self, features: int, *, epsilon: float = 1e-6, scale_axes=("kv_head_dim",),
               dtype: jnp.dtype | None = None, weight_dtype: jnp.dtype = jnp.float32):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), weight_dtype), logical_axes=tuple(scale_axes))


class RMSNorm(_ScaledNorm):
  """RMSNorm over the last axis with a learned scale (the default QK norm)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    out = _rms_normalize(x, self.epsilon) * self.scale[...].astype(_norm_dtype(x))
    return out.astype(self.dtype or x.dtype)


class L2Norm(TracksGraph, nnx.Module):
  """x / sqrt(mean(x^2) + eps) over the last axis, no parameters (Llama 4's QK norm)."""

  def __init__(self, *, epsilon: float = 1e-6, dtype: jnp.dtype | None = None):
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return _rms_normalize(x, self.epsilon).astype(self.dtype or x.dtype)


class LayerNorm(_ScaledNorm):
  """LayerNorm over the last axis with a learned scale and no bias (Flax's normalize_qk)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(_norm_dtype(x))
    normed = _rms_normalize(xf - jnp.mean(xf, axis=-1, keepdims=True), self.epsilon)
    return (normed * self.scale[...].astype(xf.dtype)).astype(self.dtype or x.dtype)


def make_qk_norm(norm_type: str, features: int, *, epsilon: float, dtype, weight_dtype):
  """The QK norm of `norm_type`: rms (RMSNorm with a scale), l2 (no parameters), layernorm
  (scale, no bias)."""
  if norm_type == "rms":
    return RMSNorm(features, epsilon=epsilon, dtype=dtype, weight_dtype=weight_dtype)
  if norm_type == "l2":
    return L2Norm(epsilon=epsilon, dtype=dtype)
  if norm_type == "layernorm":
    return LayerNorm(features, epsilon=epsilon, dtype=dtype, weight_dtype=weight_dtype)
  raise ValueError(f"qk_norm_type={norm_type!r}: allowed {list(QK_NORM_TYPES)}")
