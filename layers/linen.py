"""Linen's `MultiHeadDotProductAttention` and `SelfAttention`, on meshattn's layer.

    from meshattn.layers.linen import MultiHeadDotProductAttention  # was: flax.linen
    y = MultiHeadDotProductAttention(num_heads=8).apply(flax_variables, x)

Same fields, call and variable trees as Flax's (`params`: query / key / value /
out with kernel [and bias], query_ln / key_ln scales; `cache`: cached_key /
cached_value / cache_index with decode=True), so variables move both ways. Inside
each call the NNX drop-in (`meshattn.layers.MultiHeadAttention`, hence
`Attention`) is built from the input shapes and run through Flax's NNX -> Linen
bridge, sharing this module's scope so no extra name level appears.

With a mesh in `settings` (`settings=FrozenDict(mesh=mesh)`, optionally with
`logical_axis_rules`), each parameter comes boxed as Linen's own
`nn.LogicallyPartitioned` with the layer's logical axis names, as
`nn.with_logical_partitioning` would box it: `nn.get_partition_spec` and
`nn.logical_to_mesh_sharding(specs, mesh, rules)` then place it exactly as
`meshattn.sharding.get_param_shardings` places the NNX layer's. Without a mesh
the variables are plain arrays, Flax's trees exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

from meshattn.layers import flax_compat
from meshattn.layers.flax_compat import key_input
from meshattn.layers.linen_ops import attach_linen_dot_generals, is_linen_module_class
from meshattn.layers.projections import default_bias_init, default_kernel_init
from meshattn.layers.settings import DEFAULT_LOGICAL_AXIS_RULES, normalize_rules


class _LinenBacked(flax_compat.MultiHeadAttention):
  """The NNX drop-in, rebuilt at each Linen call; `cache_shape` recreates the decode cache
  that Linen keeps in its `cache` collection, so the bridge can load it."""

  def __init__(self, *args, cache_shape=None, cache_dtype=jnp.float32,
               force_fp32_for_softmax=False, linen_op_classes=(None, None), **kwargs):
    super().__init__(*args, **kwargs)
    if any(linen_op_classes):  # Linen dot_general classes: one op per projection, as in Flax
      attach_linen_dot_generals(self, *linen_op_classes, key=kwargs["rngs"].params())
    # Linen's layer passes this to a custom attention_fn that takes it (NNX's does not).
    self._flax_fn_keywords = {"force_fp32_for_softmax": force_fp32_for_softmax}
    if cache_shape is not None:  # [batch..., L, kv_heads, head_dim] -> init_cache's input shape
      self.init_cache((*cache_shape[:-2], 0), cache_dtype)


def _logical_boxes(mesh, rules):
  """The bridge's metadata_fn with a mesh: parameters as nn.LogicallyPartitioned by their
  logical axes (Linen's logical-sharding box); caches and anything unnamed stay raw."""

  def box(variable: nnx.Variable):
    value = variable.get_value()
    names = variable.get_metadata().get("logical_axes")
    if not isinstance(variable, nnx.Param) or names is None:
      return value
    return nn.LogicallyPartitioned(value, tuple(names), mesh=mesh, rules=rules)

  return box


def _check_cache_mutable(module, stored):
  """Flax's errors for a decode call whose `cache` collection is immutable (the layer would
  otherwise run and drop the update, so a loop decodes position 0 forever): no cache yet
  -> ScopeCollectionNotFound, as Flax reading it; a cache -> ModifyScopeVariableError."""
  if module.is_mutable_collection("cache"):
    return
  path = module.scope.path_text
  if not stored:
    raise flax.errors.ScopeCollectionNotFound("cache", "cached_key", path)
  name = "cached_key" if "cached_key" in stored else next(iter(stored))
  raise flax.errors.ModifyScopeVariableError("cache", name, path)


def _expected_param_shapes(kwargs: FrozenDict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every parameter the layer builds from `kwargs` (abstractly: no arrays)."""
  build = dict(kwargs)
  build.pop("cache_shape", None)
  abstract = nnx.eval_shape(lambda: _LinenBacked(**build, rngs=nnx.Rngs(0)))
  return {tuple(str(k) for k in path): tuple(v.shape)
          for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _check_param_shapes(module, kwargs: FrozenDict):
  """Flax's ScopeParamShapeError (naming the parameter and both shapes) for a stored
  parameter of another shape, e.g. a checkpoint of another configuration; the layer would
  otherwise fail inside a projection with an error that names neither."""
  stored = module.variables.get("params")
  if not stored:
    return
  try:
    expected = _cached_param_shapes(kwargs)
  except TypeError:  # unhashable settings: build the abstract layer every call
    expected = _expected_param_shapes(kwargs)
  for path, shape in expected.items():
    value = stored
    for name in path:
      value = value.get(name) if hasattr(value, "get") else None
    value = getattr(value, "value", value)  # nn.LogicallyPartitioned with a mesh
    if value is not None and tuple(value.shape) != shape:
      scope = "/".join((module.scope.path_text.rstrip("/"),) + path[:-1])
      raise flax.errors.ScopeParamShapeError(path[-1], scope, tuple(value.shape), shape)


_cached_param_shapes = functools.lru_cache(maxsize=64)(_expected_param_shapes)


def _stored_cache_shape(stored):
  """`_LinenBacked`'s cache_shape / cache_dtype from the stored cache: Flax's cached_key
  [batch..., L, kv_heads, head_dim], or a linear layer's state (`cache`: kv [B, K, Hk, Hv],
  one slot per row). The state keeps no length, so later calls bound it by int32 only."""
  if "cached_key" in stored:
    return dict(cache_shape=stored["cached_key"].shape, cache_dtype=stored["cached_key"].dtype)
  kv = stored["cache"]["kv"]  # [B, K, Hk, Hv]
  return dict(cache_shape=(kv.shape[0], jnp.iinfo(jnp.int32).max, *kv.shape[1:3]),
              cache_dtype=kv.dtype)


def _dot_general_keywords(module) -> dict:
  """The dot_general hooks for the NNX layer. A class wins over a function, as in Flax's
  DenseGeneral; a Linen Module class (fp8_ops) goes to `linen_op_classes`, which gives each
  projection its own op with Flax's variable paths (layers/linen_ops.py)."""
  hooks = dict(qkv_dot_general=module.qkv_dot_general, out_dot_general=module.out_dot_general,
               qkv_dot_general_cls=module.qkv_dot_general_cls,
               out_dot_general_cls=module.out_dot_general_cls)
  linen_classes = []
  for part in ("qkv", "out"):
    cls = hooks[f"{part}_dot_general_cls"]
    linen_classes.append(cls if is_linen_module_class(cls) else None)
    if cls is not None:
      hooks[f"{part}_dot_general"] = None
    if is_linen_module_class(cls):
      hooks[f"{part}_dot_general_cls"] = None
  return dict(hooks, linen_op_classes=tuple(linen_classes))


def _attend(module, inputs_q, inputs_k, inputs_v, *, decode, first_call, **kwargs):
  # Linen's decode: the call that makes the cache attends normally (not one token at a time).
  return module(inputs_q, inputs_k, inputs_v, decode=decode and not first_call, **kwargs)


class MultiHeadDotProductAttention(nn.Module):
  """flax.linen.MultiHeadDotProductAttention's fields and call, on meshattn's kernels.

  `settings` passes meshattn / attnax keywords through (num_kv_heads, attention_type,
  attention_window, use_rope, any AttentionSettings field)."""

  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  out_kernel_init: Callable | None = None
  bias_init: Callable = default_bias_init
  out_bias_init: Callable | None = None
  use_bias: bool = True
  attention_fn: Callable[..., jax.Array] = nnx.dot_product_attention
  decode: bool = False
  normalize_qk: bool = False
  # Flax's softmax in float32 for half-precision inputs: meshattn's float32_logits.
  force_fp32_for_softmax: bool = False
  qkv_dot_general: Callable | None = None
  out_dot_general: Callable | None = None
  qkv_dot_general_cls: Any = None
  out_dot_general_cls: Any = None
  # Flax hands these einsum modules to its own dot_product_attention; meshattn's kernels
  # compute q.k and p.v themselves, so they are refused (named), never ignored.
  qk_attn_weights_einsum_cls: Any = None
  attn_weights_value_einsum_cls: Any = None
  settings: FrozenDict = FrozenDict()

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, deterministic: bool | None = None,
               dropout_rng: jax.Array | None = None, sow_weights: bool = False) -> jax.Array:
    """inputs_q [batch..., T, D]; inputs_k / inputs_v [batch..., S, D_kv] (Linen's defaults
    and its deprecated inputs_kv); mask broadcastable to [batch..., heads, T, S]."""
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError("If either `inputs_k` or `inputs_v` is not None, `inputs_kv` must be "
                         "None. If `inputs_kv` is not None, both `inputs_k` and `inputs_v` must "
                         "be None.")
      inputs_k = inputs_v = inputs_kv
    inputs_k = key_input(inputs_q, inputs_k, inputs_v)
    inputs_v = inputs_k if inputs_v is None else inputs_v
    einsums = [name for name in ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls")
               if getattr(self, name) is not None]
    if einsums:
      raise NotImplementedError(f"meshattn.layers.linen.MultiHeadDotProductAttention does not "
                                f"take {einsums}: its kernels compute q.k and p.v themselves "
                                "(a custom attention_fn still runs; docs/migration.md)")
    kwargs = dict(
        num_heads=self.num_heads, in_features=inputs_q.shape[-1],
        qkv_features=self.qkv_features, out_features=self.out_features,
        in_kv_features=inputs_k.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
        broadcast_dropout=self.broadcast_dropout, dropout_rate=self.dropout_rate,
        deterministic=True, precision=self.precision, kernel_init=self.kernel_init,
        out_kernel_init=self.out_kernel_init, bias_init=self.bias_init,
        out_bias_init=self.out_bias_init, use_bias=self.use_bias, attention_fn=self.attention_fn,
        decode=self.decode, normalize_qk=self.normalize_qk,
        keep_rngs=False, **_dot_general_keywords(self), **self.settings)
    if self.force_fp32_for_softmax:  # also when `settings` names float32_logits itself
      kwargs["float32_logits"] = True
    kwargs["force_fp32_for_softmax"] = self.force_fp32_for_softmax
    # "Is there a cache yet" is whatever the layer stored (K/V arrays, or a linear layer's
    # state): Linen's first decode call makes it and attends normally.
    stored = self.variables.get("cache", {})
    first_call = not stored
    if self.decode:
      _check_cache_mutable(self, stored)
    if self.decode and not first_call:
      kwargs.update(_stored_cache_shape(stored))
    elif self.decode:  # Linen makes the cache as long as this (first) input, in K's dtype
      heads = self.num_heads
      head_dim = (self.qkv_features or inputs_q.shape[-1]) // heads
      kv_heads = self.settings.get("num_kv_heads") or heads
      dtype = self.dtype or jnp.result_type(inputs_k, self.param_dtype)
      kwargs.update(cache_shape=inputs_k.shape[:-1] + (kv_heads, head_dim), cache_dtype=dtype)
    rngs = None
    if self.dropout_rate > 0.0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic:
        key = self.make_rng("dropout") if dropout_rng is None else dropout_rng
        # Flax's dropout mask is drawn from this key itself; an nnx.Rngs(dropout=key) would
        # hand the layer fold_in(key, 0). The layer calls its stream once per call.
        rngs = lambda: key  # noqa: E731
    # Raw arrays in Linen's collections (metadata_fn=None): Flax's variable trees exactly;
    # with a mesh, parameters boxed by logical axes so Linen's sharding tools place them.
    mesh = self.settings.get("mesh")
    metadata_fn = None
    if mesh is not None:
      rules = normalize_rules(self.settings.get("logical_axis_rules", DEFAULT_LOGICAL_AXIS_RULES))
      metadata_fn = _logical_boxes(mesh, rules)
    kwargs = FrozenDict(kwargs)
    _check_param_shapes(self, kwargs)
    layer = nnx.bridge.ToLinen(_LinenBacked, kwargs=kwargs, skip_rng=False,
                               metadata_fn=metadata_fn)
    nn.share_scope(self, layer)
    return layer(inputs_q, inputs_k, inputs_v, nnx_method=_attend, decode=self.decode,
                 first_call=first_call, mask=mask, deterministic=bool(deterministic),
                 rngs=rngs, sow_weights=sow_weights)


class SelfAttention(MultiHeadDotProductAttention):
  """flax.linen.SelfAttention: MultiHeadDotProductAttention with inputs_k = inputs_v = inputs_q."""

  @nn.compact
  def __call__(self, inputs_q: jax.Array, mask: jax.Array | None = None,
               deterministic: bool | None = None, dropout_rng: jax.Array | None = None,
               sow_weights: bool = False) -> jax.Array:
    return super().__call__(inputs_q, mask=mask, deterministic=deterministic,
                            dropout_rng=dropout_rng, sow_weights=sow_weights)


class MultiHeadAttention(MultiHeadDotProductAttention):
  """flax.linen.MultiHeadAttention: MultiHeadDotProductAttention under another class name, so
  an auto-named submodule is `MultiHeadAttention_0` in the parameter tree, as in Flax."""
