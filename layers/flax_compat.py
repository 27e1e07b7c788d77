"""`MultiHeadAttention`: Flax NNX's `nnx.MultiHeadAttention`, to the letter, on meshattn's layer.

    from meshattn.layers import MultiHeadAttention      # was: from flax.nnx import ...
    attn = MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0))
    y = attn(x)                                          # [batch..., T, 512]

The constructor and the call take Flax's arguments, and the parameter tree is
Flax's (`query` / `key` / `value` / `out` with `kernel` [and `bias`],
`query_ln` / `key_ln` with `scale` for normalize_qk, `cached_key` /
`cached_value` / `cache_index` after `init_cache(shape)`), so `nnx.state`
moves between Flax's module and this one unchanged. Underneath it is
`meshattn.layers.Attention` itself (this class subclasses it): the registry
picks the kernel, params carry logical axis names, and with `mesh=` every stage
is sharded. attnax's extras (num_kv_heads, attention_type, attention_window,
use_rope, score_mod, ...) sit on the same class. docs/migration.md lists what
differs from Flax and why.
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen, nnx
from flax.typing import Shape

from meshattn.configs import vocabulary as vocab
from meshattn.configs.validation import check_values
from meshattn.layers.attention import Attention
from meshattn.layers.kernels import dispatch
from meshattn.layers.kernels.train.flax_fn import call_flax_attention_fn, flax_call
from meshattn.layers.linear.spec import LinearSpec
from meshattn.layers.masks import MaskSpec
from meshattn.layers.projections import _init_flat, default_bias_init, default_kernel_init
from meshattn.layers.rope import RopeSpec
from meshattn.layers.settings import AttentionSettings
from meshattn.layers.train_inputs import flatten_pairwise

# Flax's defaults (NNX's and Linen's): meshattn's own kernels compute the same thing.
_FLAX_ATTENTION_FNS = (nnx.dot_product_attention, linen.dot_product_attention)


class AttentionType(str, enum.Enum):
  """attnax's backend selectors, and the meshattn kernel each one runs."""

  STANDARD = "standard"  # dot_product
  MEMORY_EFFICIENT = "memory_efficient"  # blockwise (online softmax)
  FLASH = "flash"  # flash (GPU cuDNN / TPU splash)
  PALLAS_FLASH = "pallas_flash"  # flash (the registry picks the Pallas kernel of the platform)
  LINEAR = "linear"  # causal linear attention with a state cache (layers/linear)
  LITE = "lite"  # softmax attention (autoselected kernel) with the elementwise output gate


KERNEL_OF_TYPE: dict[AttentionType, str] = {
    AttentionType.STANDARD: "dot_product", AttentionType.MEMORY_EFFICIENT: "blockwise",
    AttentionType.FLASH: "flash", AttentionType.PALLAS_FLASH: "flash",
    AttentionType.LINEAR: "autoselected", AttentionType.LITE: "autoselected"}


def key_input(inputs_q, inputs_k, inputs_v):
  """Flax's default: inputs_k, else inputs_q; inputs_v without inputs_k is Flax's error."""
  if inputs_k is not None:
    return inputs_k
  if inputs_v is not None:
    raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None. To have both "
                     "`inputs_k` and `inputs_v` be the same value, pass in the value to "
                     "`inputs_k` and leave `inputs_v` as None.")
  return inputs_q


def _check_extras(attention_type, block_size, chunk_size, score_mod, rope_base, window):
  """attnax's extras, checked before anything is built; returns the AttentionType or None.
  The sizes and RoPE base follow the config rules (configs/validation.py)."""
  kind = None
  if attention_type is not None:
    try:
      kind = AttentionType(attention_type)
    except ValueError:
      raise ValueError(f"attention_type={attention_type!r}: allowed "
                       f"{[t.value for t in AttentionType]} (or an AttentionType), or None for "
                       "the registry's choice") from None
  # 0 is not "unset" here: None is (the config's POSITIVE_INTS rule).
  if block_size is not None and (not isinstance(block_size, numbers.Integral)
                                 or isinstance(block_size, bool) or block_size < 1):
    raise ValueError(f"attention_block_size={block_size!r}: must be an integer >= 1, or None")
  check_values([("linear_attention_chunk_size", chunk_size)])
  if window is not None and vocab.mask_size_problem("local_sliding", window):  # config's rule
    raise ValueError(f"attention_window={window!r}: must be an integer >= 1 (the keys each "
                     "query sees, itself included), or None")
  if score_mod is not None and not callable(score_mod):
    raise ValueError(f"score_mod={score_mod!r}: must be a callable (meshattn.layers.score_mods) "
                     "or None")
  # The config's rule for rope_max_timescale (> rope_min_timescale), which rope_base sets.
  low = RopeSpec.min_timescale
  if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real) \
      or not low < rope_base < math.inf:
    raise ValueError(f"rope_base={rope_base!r}: must be a finite number > {low} "
                     "(RopeSpec.min_timescale)")
  return kind


def _unsupported(**given: bool) -> None:
  bad = [name for name, on in given.items() if on]
  if bad:
    raise NotImplementedError(f"meshattn.layers.MultiHeadAttention does not take {bad}: "
                              "parameters are sharded by logical axis names through the mesh's "
                              "rules, and dtypes follow `dtype` (docs/migration.md)")


class MultiHeadAttention(Attention):
  """Flax NNX `MultiHeadAttention` (same arguments, parameters and results) plus attnax's extras.

  Flax arguments: see `flax.nnx.MultiHeadAttention`. attnax extras: num_kv_heads
  (GQA / MQA), attention_type (AttentionType or its string; default: the registry's
  autoselected kernel), attention_block_size (blockwise tiles), score_mod,
  attention_window (causal sliding window of that many keys), use_rope / rope_base /
  rope_max_positions. meshattn extras: mesh, and any `AttentionSettings` field as a
  keyword (attn_logits_soft_cap, logical_axis_rules, pallas_interpret, ...).
  """
  # Keywords a custom attention_fn also gets (where it takes them): Flax NNX passes none.
  _flax_fn_keywords: dict = {}

  def __init__(
      self,
      num_heads: int,
      in_features: int,
      qkv_features: int | None = None,
      out_features: int | None = None,
      num_kv_heads: int | None = None,
      in_kv_features: int | None = None,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      broadcast_dropout: bool = True,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      precision: jax.lax.PrecisionLike = None,
      kernel_init: Callable = default_kernel_init,
      out_kernel_init: Callable | None = None,
      bias_init: Callable = default_bias_init,
      out_bias_init: Callable | None = None,
      use_bias: bool = True,
      attention_fn: Callable[..., jax.Array] = nnx.dot_product_attention,
      decode: bool | None = None,
      normalize_qk: bool = False,
      qkv_promote_dtype: Any = None,
      out_promote_dtype: Any = None,
      ln_promote_dtype: Any = None,
      qkv_dot_general: Callable | None = None,
      out_dot_general: Callable | None = None,
      qkv_dot_general_cls: Any = None,
      out_dot_general_cls: Any = None,
      rngs: nnx.Rngs,
      keep_rngs: bool = True,
      kernel_metadata: Any = None,
      out_kernel_metadata: Any = None,
      bias_metadata: Any = None,
      out_bias_metadata: Any = None,
      query_ln_scale_metadata: Any = None,
      key_ln_scale_metadata: Any = None,
      # attnax
      attention_type: AttentionType | str | None = None,
      attention_block_size: int | None = None,
      linear_attention_chunk_size: int | None = None,
      score_mod: Callable[..., jax.Array] | None = None,
      attention_window: int | None = None,
      use_rope: bool = False,
      rope_base: float = 10_000.0,
      rope_max_positions: int | None = None,
      # meshattn
      mesh: jax.sharding.Mesh | None = None,
      **settings: Any,
  ):
    _unsupported(promote_dtype=any(f is not None for f in (qkv_promote_dtype, out_promote_dtype,
                                                          ln_promote_dtype)),
                 metadata=any(bool(m) for m in (kernel_metadata, out_kernel_metadata, bias_metadata,
                                                out_bias_metadata, query_ln_scale_metadata,
                                                key_ln_scale_metadata)))
    qkv_features = in_features if qkv_features is None else qkv_features
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    # Flax's and attnax's own errors, raised before meshattn's settings see the sizes.
    if qkv_features % num_heads:
      raise ValueError(f"Memory dimension ({qkv_features}) must be divisible by 'num_heads' heads "
                       f"({num_heads}).")
    if not 1 <= num_kv_heads <= num_heads or num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                       f"({num_kv_heads}), with 1 <= num_kv_heads <= num_heads.")
    head_dim = qkv_features // num_heads
    if use_rope and head_dim % 2:
      raise ValueError(f"use_rope needs an even head_dim; got qkv_features // num_heads = "
                       f"{head_dim}")
    kind = _check_extras(attention_type, attention_block_size, linear_attention_chunk_size,
                         score_mod, rope_base, attention_window)
    custom_fn = None if attention_fn in _FLAX_ATTENTION_FNS else attention_fn
    if kind is AttentionType.LITE and custom_fn is not None:
      raise ValueError("attention_fn and attention_type=LITE cannot both be given")
    # LINEAR: causal, elu + 1 with the normalizer (other variants: the `linear` keyword).
    # attnax ignores score_mod there; meshattn refuses it rather than drop it silently.
    linear = None
    if kind is AttentionType.LINEAR:
      linear = LinearSpec(chunk_size=linear_attention_chunk_size or LinearSpec.chunk_size)
    # Flax's LinearGeneral instantiates the class (which wins over the function) per call;
    # a stateless op behaves the same made once here.
    if qkv_dot_general_cls is not None:
      qkv_dot_general = qkv_dot_general_cls()
    if out_dot_general_cls is not None:
      out_dot_general = out_dot_general_cls()
    if attention_window is not None:
      mask = MaskSpec("local_sliding", window=attention_window)
    elif linear is not None:
      mask = MaskSpec("global")  # linear attention is causal
    else:
      mask = MaskSpec("full")  # Flax attends everywhere the caller's mask allows
    rope = RopeSpec(max_timescale=float(rope_base)) if use_rope else RopeSpec(rope_type="none")
    settings = {**dict(
        emb_dim=in_features, num_query_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, out_features=out_features, kv_emb_dim=in_kv_features,
        # dtype None: Flax promotes inputs and params; here the computation runs in param_dtype.
        dtype=param_dtype if dtype is None else dtype, weight_dtype=param_dtype,
        precision=precision, attention=KERNEL_OF_TYPE[kind] if kind else "autoselected",
        mask=mask, dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
        use_bias=use_bias, use_qk_norm=normalize_qk, qk_norm_type="layernorm",
        normalization_layer_epsilon=1e-6, qkv_dot_general=qkv_dot_general,
        out_dot_general=out_dot_general, rope=rope, kernel_init=kernel_init, bias_init=bias_init,
        attention_fn=custom_fn, score_mod=score_mod, linear=linear,
        attention_output_gate="elementwise" if kind is AttentionType.LITE else "none"),
        **settings}  # the caller's keywords win
    if not normalize_qk:
      self.query_ln = nnx.data(None)  # Flax's attributes, also when absent
      self.key_ln = nnx.data(None)
    # The input projections (query, key, value: fewer when meshattn fuses or shares them) draw
    # 1 + use_bias keys each, then out; Flax's LayerNorms draw theirs just before out.
    projections = (1 if settings.get("fused_qkv") else
                   2 if settings.get("share_kv_projections") else 3)
    out_draw = projections * (1 + use_bias)
    draws = _FlaxDrawOrder(rngs, skip_at=out_draw, skip=2 if normalize_qk else 0)
    super().__init__(mesh=mesh, rngs=draws, **settings)
    out_dim = self.settings.out_features or in_features
    # Attention initialises `out` with kernel_init / bias_init; Flax's own out inits get the
    # very keys that projection drew, so no key is drawn twice.
    if out_kernel_init is not None:
      self.out.kernel[...] = _init_flat(out_kernel_init, draws.keys[out_draw],
                                        (num_heads, head_dim), (out_dim,), param_dtype)
    if self.out.bias is not None and out_bias_init is not None:
      self.out.bias[...] = out_bias_init(draws.keys[out_draw + 1], (out_dim,), param_dtype)
    # Flax's public attributes (read by user code; set_view sets deterministic and decode).
    self.num_heads, self.in_features, self.num_kv_heads = num_heads, in_features, num_kv_heads
    self.qkv_features, self.head_dim = qkv_features, head_dim
    self.out_features = in_features if out_features is None else out_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
    self.dropout_rate, self.broadcast_dropout = dropout_rate, broadcast_dropout
    self.deterministic, self.decode = deterministic, decode
    self.use_bias, self.normalize_qk, self.attention_fn = use_bias, normalize_qk, attention_fn
    self.attention_block_size, self.rope_max_positions = attention_block_size, rope_max_positions
    # Flax keeps the dropout stream itself (an RngStream), so its state tree is Flax's.
    # nnx.data: Attention left `rngs` a static None (_FlaxDrawOrder.fork).
    if keep_rngs and dropout_rate > 0:
      self.rngs = nnx.data(rngs.dropout.fork())
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
               batch_size: int | Shape | None = None, max_length: int | None = None):
    """`nnx.view(layer, deterministic=..., decode=...)`: Flax's flags, and only those (nnx.view
    reports any other key as unused; nnx.view_info reads the Args below).

    Args:
      deterministic: if True, the module is set to deterministic mode.
      decode: if True, the module is set to decode mode.
      batch_size: taken as Flax takes it; builds no cache (`init_cache` does: as in Flax 0.12,
        whose cache attributes always exist).
      max_length: likewise.
    """
    del batch_size, max_length
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode

  # Attention names its QK norms query_norm / key_norm; Flax's tree says query_ln / key_ln.
  query_norm = property(lambda self: self.query_ln,
                        lambda self, module: setattr(self, "query_ln", module))
  key_norm = property(lambda self: self.key_ln,
                      lambda self, module: setattr(self, "key_ln", module))

  def _kernel_fn(self, mode, features, lengths=(None, None)):
    """Attention's kernel, with attnax's attention_block_size as the tiles of a kernel that
    takes any size (its registry row's block_keywords: blockwise)."""
    kernel = dispatch.select(self.settings, mode, features, lengths)
    fn = dispatch.load(self.settings, kernel)
    size = self.attention_block_size
    if size and kernel.block_keywords:  # the kernels whose tiles take any size (blockwise)
      fn = functools.partial(fn, **{name: size for name in kernel.block_keywords})
    return fn, kernel.length_layout

  def _call_kernel(self, kernel, axes, query, key, value, **kwargs):
    """Attention's kernel call, plus Flax's answer for a query whose mask hides every key:
    softmax over equal logits, so the average of all values (meshattn's kernels give zeros).
    Only for Flax's semantics: no structural mask, no packed segments."""
    context, weights = super()._call_kernel(kernel, axes, query, key, value, **kwargs)
    mask = kwargs.get("mask")  # [B, 1|N, T|1, S|1]
    if (mask is None or kwargs.get("q_segment_ids") is not None
        or self.settings.mask.is_causal):
      return context, weights
    has_key = jnp.any(mask, axis=-1)  # [B, 1|N, T|1]
    group = query.shape[2] // key.shape[2]
    mean_v = jnp.repeat(value.mean(axis=1, keepdims=True), group, axis=2)  # [B, 1, N, H]
    keep = jnp.swapaxes(has_key, 1, 2)[..., None]  # [B, T|1, 1|N, 1]
    context = jnp.where(keep, context, mean_v.astype(context.dtype))  # [B, T, N, H]
    if weights is not None:  # [B, N, T, S]
      weights = jnp.where(has_key[..., None], weights, jnp.asarray(1 / key.shape[1], weights.dtype))
    return context, weights

  def init_cache(self, input_shape, *args, **kwargs):
    """Flax: `init_cache(input_shape, dtype=jnp.float32)`, input_shape [batch..., max_length,
    features]: cached_key / cached_value [batch..., max_length, kv_heads, head_dim] and one
    cache_index, as Flax keeps them. An int first argument builds meshattn's own KV cache
    instead (`Attention.init_cache(batch_size, max_length, ...)`, for model_mode= calls). A
    linear-attention layer keeps no K/V: it builds its LinearStateCache, one slot per row."""
    if isinstance(input_shape, int):
      return super().init_cache(input_shape, *args, **kwargs)
    if self.settings.linear is not None:
      return super().init_cache(math.prod(input_shape[:-2]), input_shape[-2])
    dtype = args[0] if args else kwargs.pop("dtype", jnp.float32)
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, mask: jax.Array | None = None,
               deterministic: bool | None = None, rngs: nnx.Rngs | nnx.RngStream | None = None,
               sow_weights: bool = False, decode: bool | None = None, is_causal: bool = False,
               out_sharding=None, qkv_sharding=None, **meshattn_kwargs: Any) -> jax.Array:
    """Flax's call: inputs_q [batch..., T, D], inputs_k / inputs_v [batch..., S, D_kv]
    (default inputs_q, and inputs_v defaults to inputs_k); mask broadcastable to
    [batch..., heads, T, S] (True keeps). Returns [batch..., T, out_features].

    meshattn_kwargs (inputs_positions, decoder_segment_ids, bias, model_mode, slots, ...)
    go to `Attention.__call__`; with model_mode, Flax's decode flag is not read."""
    _unsupported(out_sharding=out_sharding is not None, qkv_sharding=qkv_sharding is not None)
    stream = self.rngs if rngs is None else (rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs)
    inputs_k = key_input(inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but module "
                       f"expects {self.in_features}.")
    if self.dropout_rate > 0.0:  # Flax asks for `deterministic` only when there is dropout
      deterministic = nnx.module.first_from(
          deterministic, self.deterministic, error_msg="No `deterministic` argument was provided "
          "to MultiHeadAttention as either a __call__ argument, class attribute, or nnx.flag.")
      if not deterministic and stream is None:
        raise ValueError("'rngs' must be provided to __call__ method if MultiHeadAttention "
                         "instance is defined with keep_rngs=False.")
    else:
      deterministic = True
    if is_causal:
      causal = jnp.tril(jnp.ones((inputs_q.shape[-2], inputs_k.shape[-2]), bool))  # [T, S]
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    # Attention draws dropout keys as `rngs.dropout()`; Flax hands over the stream itself.
    dropout = None if stream is None else types.SimpleNamespace(dropout=stream)
    values = None if inputs_v is None or inputs_v is inputs_k else inputs_v
    # A custom attention_fn gets Flax's module= and is_causal= (flax_fn.flax_call).
    with flax_call(self if sow_weights else None, is_causal, **self._flax_fn_keywords):
      if "model_mode" not in meshattn_kwargs and nnx.module.first_from(
          decode, self.decode, error_msg="No `decode` argument was provided to "
          "MultiHeadAttention as either a __call__ argument, class attribute, or nnx.flag."):
        if meshattn_kwargs:
          raise ValueError(f"decode=True takes Flax's arguments only, not "
                           f"{sorted(meshattn_kwargs)}")
        return self._flax_decode(inputs_q, inputs_k, inputs_k if values is None else values,
                                 mask, deterministic, dropout, sow_weights)
      if not meshattn_kwargs and inputs_q.ndim == inputs_k.ndim == 2 and (
          values is None or values.ndim == 2):
        return self._unbatched(inputs_q, inputs_k, values, mask, deterministic, dropout,
                               sow_weights)
      return super().__call__(inputs_q, inputs_k, inputs_v=values, mask=mask,
                              deterministic=deterministic, rngs=dropout, sow_weights=sow_weights,
                              **meshattn_kwargs)

  def _unbatched(self, inputs_q, inputs_k, values, mask, deterministic, dropout, sow_weights):
    """Flax's unbatched call: inputs_q [T, D], inputs_k / values [S, D_kv], mask broadcastable
    to [N, T, S]; runs as a batch of one and returns [T, D_out] (sown weights [N, T, S])."""
    batched = lambda x: None if x is None else x[None]  # [1, T|S, D]
    if mask is not None:
      mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [1, 1|N, 1|T, 1|S]
    sown = lambda: getattr(self, "attention_weights", None)
    before = len(sown()) if sown() is not None else 0
    out = super().__call__(batched(inputs_q), batched(inputs_k), inputs_v=batched(values),
                           mask=mask, deterministic=deterministic, rngs=dropout,
                           sow_weights=sow_weights)  # [1, T, D_out]
    if sown() is not None and len(sown()) > before:  # this call's [1, N, T, S]: Flax's [N, T, S]
      weights = sown().get_value()
      sown().set_value(weights[:-1] + (weights[-1][0],))
    return out[0]

  def _flax_decode(self, inputs_q, inputs_k, inputs_v, mask, deterministic, dropout, sow_weights):
    """One token per call against Flax's cache: write K/V at cache_index, attend over
    keys 0..cache_index (and the caller's mask), advance cache_index. A linear layer
    continues each row's state instead (_linear_decode)."""
    if self.settings.linear is not None:
      return self._linear_decode(inputs_q, inputs_k, inputs_v, mask)
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    s = self.settings
    *batch_dims, max_length, kv_heads, head_dim = self.cached_key.shape
    batch_dims = tuple(batch_dims)
    for name, x in (("query", inputs_q), ("key", inputs_k), ("value", inputs_v)):
      if x.shape[:-1] != batch_dims + (1,):
        raise ValueError(f"Autoregressive cache shape error, expected {name} input shape "
                         f"{batch_dims + (1, x.shape[-1])} instead got {x.shape}.")
    batch = math.prod(batch_dims)
    index = self.cache_index[...]
    positions = jnp.full((batch, 1), index, jnp.int32)  # [B, 1]: RoPE and the window count here
    axes = s.axes["autoregressive"]
    flat = lambda x: x.reshape((batch, 1, x.shape[-1]))  # [B, 1, D]
    query, key, value = self._qkv(flat(inputs_q), flat(inputs_k), False, axes, positions,
                                  positions, flat(inputs_v))  # [B, 1, N|K, H]
    cache_shape = (batch, max_length, kv_heads, head_dim)
    start = (0, index, 0, 0)
    keys = jax.lax.dynamic_update_slice(self.cached_key[...].reshape(cache_shape),
                                        key.astype(self.cached_key.dtype), start)  # [B, L, K, H]
    values = jax.lax.dynamic_update_slice(self.cached_value[...].reshape(cache_shape),
                                          value.astype(self.cached_value.dtype), start)
    self.cached_key[...] = keys.reshape(self.cached_key.shape)
    self.cached_value[...] = values.reshape(self.cached_value.shape)
    self.cache_index[...] = index + 1
    written = jnp.arange(max_length) <= index  # [L]: Flax's decode mask
    user = flatten_pairwise(mask, batch_dims, batch)  # [B, 1|N, 1, L] or None
    visible = written[None, None, None] if user is None else jnp.logical_and(user, written)
    visible = jnp.broadcast_to(visible, (batch,) + visible.shape[1:])  # [B, 1|N, 1, L]
    kv_positions = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))
    dropout_rng = dropout.dropout() if dropout is not None and not deterministic else None
    args = dict(options=dispatch.kernel_options(s), q_positions=positions, kv_positions=kv_positions,
                q_segment_ids=None, kv_segment_ids=None, sinks=None, mask=visible, bias=None,
                dropout_rng=dropout_rng, deterministic=deterministic)
    keys, values = keys.astype(query.dtype), values.astype(query.dtype)
    if s.attention_fn is not None:
      context, weights = call_flax_attention_fn(s.attention_fn, query, keys, values, dtype=s.dtype,
                                                precision=s.precision, **args)
    else:
      features = dispatch.call_features(s, "train", mask=True, dropout=dropout_rng is not None,
                                        weights=sow_weights)
      kernel, layout = self._kernel_fn("train", features, (1, max_length))
      # One query token: no sequence to split, so the kernel runs auto-sharded.
      context, weights = self._call_kernel(kernel, axes, query, keys, values, shard=False,
                                           layout=layout, return_weights=sow_weights, **args)
    if sow_weights and weights is not None:
      weights = weights.reshape(batch_dims + weights.shape[1:])  # [batch..., N, 1, L]
      self.sow(nnx.Intermediate, "attention_weights", weights)
    out = self._output(context, axes, flat(inputs_q))  # [B, 1, D_out]
    return out.reshape(batch_dims + out.shape[1:])

  def _linear_decode(self, inputs_q, inputs_k, inputs_v, mask):
    """Flax's decode for a linear-attention layer: one token per row and call, continuing the
    row's state in its LinearStateCache (a one-token prefill: it also serves the first token)."""
    if self.cache is None:
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    if mask is not None or inputs_k is not inputs_q or inputs_v is not inputs_q:
      raise ValueError("decode=True with linear attention takes self-attention inputs and no mask")
    batch_dims = inputs_q.shape[:-2]
    if inputs_q.shape[-2] != 1 or math.prod(batch_dims) != self.cache.batch_size:
      raise ValueError(f"Autoregressive cache shape error, expected query input shape "
                       f"[batch..., 1, features] with {self.cache.batch_size} rows, got "
                       f"{inputs_q.shape}.")
    out = Attention.__call__(self, inputs_q.reshape((-1, 1, inputs_q.shape[-1])),
                             model_mode="prefill")  # [B, 1, D_out]
    return out.reshape(batch_dims + out.shape[1:])


class _FlaxDrawOrder:
  """The `rngs` Attention is built with, so that nnx.Rngs(seed) gives flax.nnx's parameters.

  Attention draws params keys for query, key, value, then out (then extras Flax lacks).
  Flax's normalize_qk LayerNorms draw one key each between value and out: those `skip` keys
  are drawn from the caller's stream, unused, before the `skip_at`-th key. Attention's own
  dropout fork (`fork()`) draws nothing: Flax forks the dropout stream once, with keep_rngs,
  and the drop-in does that itself, so the caller's streams end where Flax leaves them.
  """

  def __init__(self, rngs: nnx.Rngs, *, skip_at: int, skip: int):
    self._rngs, self._skip_at, self._skip = rngs, skip_at, skip
    self.keys: list[jax.Array] = []  # every params key handed out, in order

  def params(self) -> jax.Array:
    if len(self.keys) == self._skip_at:
      for _ in range(self._skip):
        self._rngs.params()
    self.keys.append(self._rngs.params())
    return self.keys[-1]

  def fork(self) -> None:
    return None  # MultiHeadAttention.__init__ sets self.rngs as Flax does
