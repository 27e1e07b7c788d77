"""The Attention layer: projections, QK norm, RoPE, kernel, output projection.

    cfg = load_config("tiny")
    attn = Attention(cfg, mesh=create_mesh(cfg), rngs=nnx.Rngs(0))
    y = attn(x, x, inputs_positions=pos, decoder_segment_ids=seg, model_mode="train")

or, without a config, `Attention(emb_dim=512, num_query_heads=8, num_kv_heads=2,
rngs=nnx.Rngs(0))` (keywords are the fields of `AttentionSettings`).

Sharding: with a mesh, every stage (inputs, Q/K/V, context, output) is
constrained to the logical names of the current mode through the logical axis
rules (Auto mesh axes + `with_sharding_constraint`); without one, nothing is
constrained. Named checkpoints (`query_proj`, `key_proj`, `value_proj`,
`context`, `out_proj`) let remat policies save those tensors.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from meshattn.layers.kernels.dot_product import KernelOptions, dot_product_attention
from meshattn.layers.kernels.flax_fn import call_flax_attention_fn
from meshattn.layers.projections import DenseGeneral, RMSNorm
from meshattn.layers.rope import apply_rope
from meshattn.layers.settings import MODEL_MODES, AttentionSettings
from meshattn.sharding import constrain

KNOWN_KERNELS: tuple[str, ...] = ("dot_product", "autoselected")


class Attention(nnx.Module):
  """Multi-head (MHA / GQA / MQA) attention for LLMs, config-driven and sharded."""

  def __init__(self, config=None, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs,
               layer_idx: int = 0, **overrides: Any):
    if config is not None:
      settings = AttentionSettings.from_config(config, layer_idx=layer_idx, **overrides)
    else:
      settings = AttentionSettings.with_overrides({}, overrides)
    if settings.attention not in KNOWN_KERNELS:
      raise ValueError(f"attention={settings.attention!r}: allowed {KNOWN_KERNELS}")
    self.settings = settings
    self.mesh = mesh
    s = settings
    n, k, h, d = s.num_query_heads, s.num_kv_heads, s.head_dim, s.emb_dim
    kv_d = s.kv_emb_dim or d
    dense = dict(rngs=rngs, use_bias=s.use_bias, kernel_init=s.kernel_init, bias_init=s.bias_init,
                 dtype=s.dtype, weight_dtype=s.weight_dtype, precision=s.precision)
    if s.fused_qkv:
      # [D, K, G + 2, H]: per kv head, its G query heads then its key and value,
      # so sharding K over `tensor` keeps every group's q/k/v on one shard.
      self.qkv_proj = DenseGeneral((d,), (k, s.group_size + 2, h),
                                   kernel_axes=("embed", "kv_heads", None, "kv_head_dim"),
                                   bias_axes=("kv_heads", None, "kv_head_dim"), **dense)
    else:
      self.query = DenseGeneral((d,), (n, h), kernel_axes=("embed", "q_heads", "kv_head_dim"),
                                bias_axes=("q_heads", "kv_head_dim"), **dense)
      self.key = DenseGeneral((kv_d,), (k, h), kernel_axes=("embed", "kv_heads", "kv_head_dim"),
                              bias_axes=("kv_heads", "kv_head_dim"), **dense)
      if not s.share_kv_projections:
        self.value = DenseGeneral((kv_d,), (k, h), kernel_axes=("embed", "kv_heads", "kv_head_dim"),
                                  bias_axes=("kv_heads", "kv_head_dim"), **dense)
    self.out = DenseGeneral((n, h), (s.out_features or d,),
                            kernel_axes=("q_heads", "kv_head_dim", "embed"), bias_axes=("embed",),
                            **dense)
    if s.use_qk_norm:
      norm = dict(epsilon=s.normalization_layer_epsilon, dtype=s.dtype, weight_dtype=s.weight_dtype)
      self.query_norm = RMSNorm(h, **norm)
      self.key_norm = RMSNorm(h, **norm)
    if s.attention_sink:
      self.sinks = nnx.Param(jnp.zeros((n,), s.weight_dtype), logical_axes=("q_heads",))
    # Dropout draws from this layer's own stream unless the call passes rngs.
    self.rngs = rngs.fork() if s.dropout_rate > 0 else None

  # ---- helpers ---------------------------------------------------------------

  def _constrain(self, x: jax.Array, names) -> jax.Array:
    return constrain(x, names, self.mesh, self.settings.logical_axis_rules)

  def _project_qkv(self, inputs_q, inputs_kv):
    """Q [B, T, N, H], K and V [B, S, K, H] before norms and RoPE."""
    s = self.settings
    if s.fused_qkv:
      if inputs_kv is not inputs_q:
        raise ValueError("fused_qkv projects self-attention only: pass inputs_kv=None or the same array")
      qkv = self.qkv_proj(inputs_q)  # [B, T, K, G + 2, H]
      b, t = qkv.shape[:2]
      g = s.group_size
      query = qkv[:, :, :, :g].reshape(b, t, s.num_query_heads, s.head_dim)  # [B, T, N, H]
      return query, qkv[:, :, :, g], qkv[:, :, :, g + 1]
    query = self.query(inputs_q)  # [B, T, N, H]
    key = self.key(inputs_kv)  # [B, S, K, H]
    value = key if s.share_kv_projections else self.value(inputs_kv)  # [B, S, K, H]
    return query, key, value

  def _kernel_options(self) -> KernelOptions:
    s = self.settings
    return KernelOptions(
        mask=s.mask, scale=s.scale, soft_cap=s.attn_logits_soft_cap,
        float32_qk_product=s.float32_qk_product, float32_logits=s.float32_logits,
        dropout_rate=s.dropout_rate, broadcast_dropout=s.broadcast_dropout, precision=s.precision)

  # ---- call -----------------------------------------------------------------

  def __call__(
      self,
      inputs_q: jax.Array,
      inputs_kv: jax.Array | None = None,
      inputs_positions: jax.Array | None = None,
      decoder_segment_ids: jax.Array | None = None,
      *,
      inputs_kv_positions: jax.Array | None = None,
      kv_segment_ids: jax.Array | None = None,
      mask: jax.Array | None = None,
      bias: jax.Array | None = None,
      model_mode: str = "train",
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      sow_weights: bool = False,
  ) -> jax.Array:
    """Attend inputs_q [..., T, D] over inputs_kv [..., S, D_kv] (default: inputs_q).

    inputs_positions [..., T]: token positions for RoPE (default 0..T-1), so
      packed sequences restart at 0; inputs_kv_positions [..., S] likewise
      (default inputs_positions for self-attention, else 0..S-1).
    decoder_segment_ids [..., T] (and kv_segment_ids [..., S] for
      cross-attention): packing ids; tokens attend only within their segment,
      and segment 0 (padding) attends nowhere and outputs zeros.
    mask / bias: broadcastable to [..., N, T, S] (Flax convention; True keeps).
    The structural mask (causal / window / chunk) is on token index within
      the row in train mode.
    """
    s = self.settings
    if model_mode not in MODEL_MODES:
      raise ValueError(f"model_mode={model_mode!r}: allowed {MODEL_MODES}")
    if model_mode != "train":
      raise ValueError(f"model_mode={model_mode!r} needs the KV cache, which this build does not "
                       "have yet; only model_mode='train' is supported")
    self_attention = inputs_kv is None or inputs_kv is inputs_q
    if inputs_kv is None:
      inputs_kv = inputs_q
    if inputs_q.ndim < 3 or inputs_kv.ndim != inputs_q.ndim:
      raise ValueError(f"inputs_q {inputs_q.shape} and inputs_kv {inputs_kv.shape} must be "
                       "[batch..., length, features] with the same batch dims")
    batch_shape = inputs_q.shape[:-2]
    if inputs_kv.shape[:-2] != batch_shape:
      raise ValueError(f"inputs_kv batch dims {inputs_kv.shape[:-2]} != inputs_q batch dims {batch_shape}")
    q_len, kv_len = inputs_q.shape[-2], inputs_kv.shape[-2]
    batch = math.prod(batch_shape)

    def flat(x, trailing):  # [batch..., *trailing] (leading dims broadcast) -> [B, *trailing]
      if x is None:
        return None
      x = jnp.broadcast_to(x, batch_shape + x.shape[x.ndim - trailing:])
      return x.reshape((batch,) + x.shape[len(batch_shape):])

    x_q = flat(inputs_q, 2)  # [B, T, D]
    x_kv = x_q if self_attention else flat(inputs_kv, 2)  # [B, S, D_kv]
    q_pos = flat(inputs_positions, 1)
    if q_pos is None:
      q_pos = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))  # [B, T]
    kv_pos = flat(inputs_kv_positions, 1)
    if kv_pos is None:
      kv_pos = q_pos if self_attention else jnp.broadcast_to(
          jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))  # [B, S]
    q_seg = flat(decoder_segment_ids, 1)  # [B, T]
    kv_seg = flat(kv_segment_ids, 1) if kv_segment_ids is not None else q_seg  # [B, S]
    if q_seg is not None and kv_seg.shape[-1] != kv_len:
      raise ValueError("cross-attention with decoder_segment_ids needs kv_segment_ids [..., S]")
    user_mask = _flatten_pairwise(mask, batch_shape, batch)
    user_bias = _flatten_pairwise(bias, batch_shape, batch)

    axes = s.axes[model_mode]
    x_q = self._constrain(x_q, axes.inputs)
    if not self_attention:
      x_kv = self._constrain(x_kv, axes.inputs)
    query, key, value = self._project_qkv(x_q, x_kv if not self_attention else x_q)
    query = checkpoint_name(self._constrain(query, axes.query), "query_proj")  # [B, T, N, H]
    key = checkpoint_name(self._constrain(key, axes.key), "key_proj")  # [B, S, K, H]
    value = checkpoint_name(self._constrain(value, axes.value), "value_proj")  # [B, S, K, H]

    if s.use_qk_norm:
      query = self.query_norm(query)
      key = self.key_norm(key)
    query = apply_rope(query, q_pos, s.rope)  # [B, T, N, H]
    key = apply_rope(key, kv_pos, s.rope)  # [B, S, K, H]

    # The structural mask runs on token index in train mode (positions only rotate).
    q_idx = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))  # [B, T]
    kv_idx = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))  # [B, S]
    dropout_rng = None
    if s.dropout_rate > 0 and not deterministic:
      stream = rngs if rngs is not None else self.rngs
      dropout_rng = stream.dropout()
    sinks = self.sinks[...] if s.attention_sink else None
    if s.attention_fn is not None:
      context, weights = call_flax_attention_fn(
          s.attention_fn, query, key, value, options=self._kernel_options(), q_positions=q_idx,
          kv_positions=kv_idx, q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=sinks,
          mask=user_mask, bias=user_bias, dropout_rng=dropout_rng, deterministic=deterministic,
          dtype=s.dtype, precision=s.precision)
    else:
      context, weights = dot_product_attention(
          query, key, value, options=self._kernel_options(), q_positions=q_idx, kv_positions=kv_idx,
          q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=sinks, mask=user_mask, bias=user_bias,
          dropout_rng=dropout_rng, deterministic=deterministic, return_weights=sow_weights)
    if sow_weights and weights is not None:
      self.sow(nnx.Intermediate, "attention_weights", weights.reshape(batch_shape + weights.shape[1:]))
    context = checkpoint_name(self._constrain(context, axes.out), "context")  # [B, T, N, H]

    out = self.out(context)  # [B, T, D_out]
    out = checkpoint_name(self._constrain(out, axes.inputs), "out_proj")
    return out.reshape(batch_shape + out.shape[1:])


def _flatten_pairwise(x: jax.Array | None, batch_shape: tuple[int, ...], batch: int):
  """A mask/bias broadcastable to [batch..., heads, T, S] -> [B, heads|1, T|1, S|1]."""
  if x is None:
    return None
  rank = len(batch_shape) + 3
  if x.ndim > rank:
    raise ValueError(f"mask/bias of shape {x.shape} has more dims than [batch..., heads, q_len, kv_len]")
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
  return x.reshape((batch,) + x.shape[len(batch_shape):])
