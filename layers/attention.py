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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from meshattn.configs.vocabulary import DECODE_KERNELS, TRAIN_KERNELS
from meshattn.kvcache.base import CacheBase
from meshattn.kvcache.graph_epoch import TracksGraph
from meshattn.kvcache.quant import from_cache_basis, to_cache_basis
from meshattn.layers.cache_builder import init_caches
from meshattn.layers.cached_step import cached_attention, step_positions
from meshattn.layers.kernels import dispatch
from meshattn.layers.linear.steps import check_linear_call
from meshattn.layers.output_gate import make_output_gate
from meshattn.layers.positions import temperature_tune
from meshattn.layers.projections import DenseGeneral, make_qk_norm
from meshattn.layers.quantization import projection_dot_general
from meshattn.layers.rope import apply_rope
from meshattn.layers.settings import MODEL_MODES, AttentionSettings
from meshattn.layers.step_inputs import (plan_step, record, refuse_train_arguments, restore_on_error,
                                         rope_positions)
from meshattn.layers.train_attention import train_context
from meshattn.layers.train_inputs import flatten_train_inputs
from meshattn.sharding import constrain

KNOWN_KERNELS: tuple[str, ...] = TRAIN_KERNELS


class Attention(TracksGraph, nnx.Module):
  """Multi-head (MHA / GQA / MQA) attention for LLMs, config-driven and sharded."""

  def __init__(self, config=None, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs,
               layer_idx: int = 0, **overrides: Any):
    if config is not None:
      settings = AttentionSettings.from_config(config, layer_idx=layer_idx, **overrides)
    else:
      settings = AttentionSettings.with_overrides({}, overrides)
    if settings.attention not in KNOWN_KERNELS:
      raise ValueError(f"attention={settings.attention!r}: allowed {KNOWN_KERNELS} "
                       f"(decode kernels go in decode_attention: {DECODE_KERNELS})")
    if settings.decode_attention not in DECODE_KERNELS:
      raise ValueError(f"decode_attention={settings.decode_attention!r}: allowed {DECODE_KERNELS}")
    self.settings = settings
    self.mesh = mesh
    s = settings
    n, k, h, d = s.num_query_heads, s.num_kv_heads, s.head_dim, s.emb_dim
    kv_d = s.kv_emb_dim or d
    quantized = projection_dot_general(s.quantization)  # None unless quantization is set
    common = dict(rngs=rngs, use_bias=s.use_bias, kernel_init=s.kernel_init,
                  bias_init=s.bias_init, dtype=s.dtype, weight_dtype=s.weight_dtype,
                  precision=s.precision)
    dense = dict(common, dot_general=s.qkv_dot_general or quantized)  # q / k / v
    dense_out = dict(common, dot_general=s.out_dot_general or quantized)
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
                            **dense_out)
    self.gate = make_output_gate(s.attention_output_gate, d, n, h, **dense)  # None: no gate
    if s.use_qk_norm:
      norm = dict(epsilon=s.normalization_layer_epsilon, dtype=s.dtype, weight_dtype=s.weight_dtype)
      self.query_norm = make_qk_norm(s.qk_norm_type, h, **norm)
      self.key_norm = make_qk_norm(s.qk_norm_type, h, **norm)
    if s.attention_sink:
      self.sinks = nnx.Param(jnp.zeros((n,), s.weight_dtype), logical_axes=("q_heads",))
    # Dropout draws from this layer's own stream unless the call passes rngs.
    self.rngs = rngs.fork() if s.dropout_rate > 0 else None
    self.cache: CacheBase | None = nnx.data(None)  # created by init_cache

  # ---- helpers ---------------------------------------------------------------

  def _constrain(self, x: jax.Array, names) -> jax.Array:
    return constrain(x, names, self.mesh, self.settings.logical_axis_rules)

  def _project_qkv(self, inputs_q, inputs_kv, inputs_v=None):
    """Q [B, T, N, H], K and V [B, S, K, H] before norms and RoPE (V from inputs_v if given)."""
    s = self.settings
    if inputs_v is not None and (s.fused_qkv or s.share_kv_projections):
      raise ValueError("a separate inputs_v needs separate key / value projections")
    if s.fused_qkv:
      # Decided by identity: under jit two equal arrays cannot be told apart, so
      # anything but the query input itself is refused rather than ignored.
      if inputs_kv is not inputs_q:
        raise ValueError("fused_qkv projects self-attention only: pass inputs_kv=None (or the "
                         "inputs_q array itself); use separate projections for cross-attention")
      qkv = self.qkv_proj(inputs_q)  # [B, T, K, G + 2, H]
      b, t = qkv.shape[:2]
      g = s.group_size
      query = qkv[:, :, :, :g].reshape(b, t, s.num_query_heads, s.head_dim)  # [B, T, N, H]
      return query, qkv[:, :, :, g], qkv[:, :, :, g + 1]
    query = self.query(inputs_q)  # [B, T, N, H]
    key = self.key(inputs_kv)  # [B, S, K, H]
    value = key if s.share_kv_projections else self.value(
        inputs_kv if inputs_v is None else inputs_v)  # [B, S, K, H]
    return query, key, value

  # ---- kernel hooks (kernels/dispatch.py decides; subclasses may wrap) ---------

  def _kernel_fn(self, mode: str, features: frozenset[str], lengths=(None, None)):
    """(kernel fn, length layout) of a train-protocol call (dispatch.train_kernel)."""
    return dispatch.train_kernel(self.settings, mode, features, lengths)

  def _call_kernel(self, kernel, axes, query, key, value, *, shard: bool = True,
                   layout: str = "split", return_weights: bool = False, **kernel_args):
    """A train kernel, under shard_map over the layer's mesh unless `shard` is False."""
    return dispatch.call_train_kernel(kernel, self.mesh, self.settings.logical_axis_rules, axes,
                                      query, key, value, shard=shard, layout=layout,
                                      return_weights=return_weights, **kernel_args)

  # ---- call -----------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int | None = None, *, for_prefill: bool = False,
                 ring_buffer: bool | None = None, paged: bool | None = None) -> CacheBase:
    """Build the cache `settings.cache` names for `batch_size` slots of `max_length` tokens.

    Layout: `ar_cache_axis_order`, or `prefill_cache_axis_order` when
    `for_prefill` (a cache whose sequences are later `insert`ed into a decode
    cache). Sliding-window layers get a ring buffer of `sliding_window_size`
    entries unless `ring_buffer=False` (or `sliding_window_ring_buffer: false`).
    `paged` (default `paged_kv_cache`) builds a PagedKVCache of `num_pages` pages of
    `tokens_per_page` tokens instead (no ring_buffer / for_prefill: ValueError), whose
    pages are reserved with `cache.reserve_for_step(slots, tokens)` before each step.
    """
    return init_caches([self], batch_size, max_length, for_prefill=for_prefill,
                       ring_buffer=ring_buffer, paged=paged)[0]

  def __call__(
      self,
      inputs_q: jax.Array,
      inputs_kv: jax.Array | None = None,
      inputs_positions: jax.Array | None = None,
      decoder_segment_ids: jax.Array | None = None,
      *,
      inputs_v: jax.Array | None = None,
      inputs_kv_positions: jax.Array | None = None,
      kv_segment_ids: jax.Array | None = None,
      mask: jax.Array | None = None,
      bias: jax.Array | None = None,
      model_mode: str = "train",
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      sow_weights: bool = False,
      slots: jax.Array | None = None,
  ) -> jax.Array:
    """Attend inputs_q [..., T, D] over inputs_kv [..., S, D_kv] (default: inputs_q); values
    from inputs_v [..., S, D_kv] when given (Flax's separate inputs_k / inputs_v).

    train:
      inputs_positions [..., T]: token positions for RoPE (default 0..T-1), so
        packed sequences restart at 0; inputs_kv_positions [..., S] likewise
        (default inputs_positions for self-attention, else 0..S-1).
      decoder_segment_ids [..., T] (and kv_segment_ids [..., S] for
        cross-attention): packing ids; tokens attend only within their
        segment, and segment 0 (padding) attends nowhere and outputs zeros.
      mask / bias: broadcastable to [..., N, T, S] (Flax convention; True keeps).
      The structural mask (causal / window / chunk) is on token index; with
      decoder_segment_ids (and no kv_segment_ids) it counts from each packed
      sequence's first token, so a chunk starts with its sequence, as when the
      sequence runs alone.
    prefill / autoregressive (self-attention over the KV cache, see init_cache):
      inputs_q [B, T, D] (T = 1 when autoregressive). Row b continues the
      sequence in cache slot `slots[b]` (default: row b -> slot b, and then B
      must equal the cache's batch size) at that slot's current length;
      decoder_segment_ids marks real tokens (nonzero) vs right padding (0).
      Autoregressive rows whose slot is empty (length 0) output zeros and
      leave the slot empty. inputs_positions, if given, only drives RoPE.
    """
    if model_mode not in MODEL_MODES:
      raise ValueError(f"model_mode={model_mode!r}: allowed {MODEL_MODES}")
    for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv), ("inputs_v", inputs_v)):
      if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be floating-point activations [batch..., length, "
                         f"features], got dtype {jnp.result_type(x)} (embed token ids first)")
    if model_mode == "train":
      if slots is not None:
        raise ValueError("slots is only used with model_mode='prefill' or 'autoregressive'")
      return self._train(inputs_q, inputs_kv, inputs_positions, decoder_segment_ids,
                         inputs_v=inputs_v, inputs_kv_positions=inputs_kv_positions,
                         kv_segment_ids=kv_segment_ids, mask=mask, bias=bias,
                         deterministic=deterministic, rngs=rngs, sow_weights=sow_weights)
    refuse_train_arguments(self.settings, model_mode, inputs_q=inputs_q, inputs_kv=inputs_kv,
                           inputs_v=inputs_v, inputs_kv_positions=inputs_kv_positions,
                           kv_segment_ids=kv_segment_ids, mask=mask, bias=bias,
                           sow_weights=sow_weights, deterministic=deterministic)
    return self._cached(inputs_q, inputs_positions, decoder_segment_ids, model_mode=model_mode,
                        slots=slots)

  def _qkv(self, x_q, x_kv, self_attention, axes, q_pos, kv_pos, x_v=None):
    """Project, constrain, QK-norm and rotate: Q [B, T, N, H], K and V [B, S, K, H]."""
    s = self.settings
    x_q = self._constrain(x_q, axes.inputs)
    if not self_attention:
      x_kv = self._constrain(x_kv, axes.inputs)
    x_v = None if x_v is None else self._constrain(x_v, axes.inputs)
    query, key, value = self._project_qkv(x_q, x_q if self_attention else x_kv, x_v)
    query = checkpoint_name(self._constrain(query, axes.query), "query_proj")  # [B, T, N, H]
    key = checkpoint_name(self._constrain(key, axes.key), "key_proj")  # [B, S, K, H]
    value = checkpoint_name(self._constrain(value, axes.value), "value_proj")  # [B, S, K, H]
    # Llama 4 applies its L2 norm after RoPE (the same unless RoPE scales,
    # as YaRN's attention factor does); RMSNorm / LayerNorm go before it.
    norm_after_rope = s.qk_norm_type == "l2"
    if s.use_qk_norm and not norm_after_rope:
      query = self.query_norm(query)
      key = self.key_norm(key)
    query = apply_rope(query, q_pos, s.rope)  # [B, T, N, H]
    key = apply_rope(key, kv_pos, s.rope)  # [B, S, K, H]
    if s.use_qk_norm and norm_after_rope:
      query = self.query_norm(query)
      key = self.key_norm(key)
    if s.temperature_tuning:  # MRoPE streams: the temporal one (a NoPE layer has no rotation)
      query = temperature_tune(query, q_pos[0] if q_pos.ndim == 3 else q_pos,
                               scale=s.temperature_tuning_scale,
                               floor_scale=s.temperature_tuning_floor_scale)
    return query, key, value

  def _output(self, context, axes, inputs):
    """Context [B, T, N, H] (gated by the layer's inputs [B, T, D]) -> output [B, T, D_out]."""
    context = checkpoint_name(self._constrain(context, axes.out), "context")  # [B, T, N, H]
    if self.gate is not None:
      context = self.gate(self._constrain(inputs, axes.inputs), context)  # [B, T, N, H]
    out = self.out(context)  # [B, T, D_out]
    return checkpoint_name(self._constrain(out, axes.inputs), "out_proj")

  def _train(self, inputs_q, inputs_kv, inputs_positions, decoder_segment_ids, *, inputs_v,
             inputs_kv_positions, kv_segment_ids, mask, bias, deterministic, rngs, sow_weights):
    s = self.settings
    inputs = flatten_train_inputs(inputs_q, inputs_kv, inputs_v, inputs_positions,
                                  inputs_kv_positions, decoder_segment_ids, kv_segment_ids, mask,
                                  bias, position_streams=s.num_position_streams)
    axes = s.axes["train"]
    if s.linear is not None:
      check_linear_call(self_attention_length=len(set(inputs.lengths)) == 1, mask=mask, bias=bias,
                        sow_weights=sow_weights, kv_segment_ids=kv_segment_ids)
    query, key, value = self._qkv(inputs.x_q, inputs.x_kv, inputs.self_attention, axes,
                                  inputs.q_pos, inputs.kv_pos, inputs.x_v)
    context = train_context(self, query, key, value, inputs, axes=axes, deterministic=deterministic,
                            rngs=rngs, sow_weights=sow_weights)  # [B, T, N, H]
    out = self._output(context, axes, inputs.x_q)  # [B, T, D_out]
    return out.reshape(inputs.batch_shape + out.shape[1:])

  def _cached(self, inputs_q, inputs_positions, decoder_segment_ids, *, model_mode, slots):
    s = self.settings
    cache = self.cache
    # Checked once for the whole call (every chunk included) before anything is written.
    plan = plan_step(s, cache, inputs_q, decoder_segment_ids, slots, model_mode)
    length = inputs_q.shape[1]
    positions = step_positions(cache, jnp.clip(plan.rows, 0, cache.batch_size - 1), length)  # [B, T]
    rotated = rope_positions(inputs_positions, positions, s.num_position_streams)  # [B, T] / [n, B, T]
    axes = s.axes[model_mode]
    query, key, value = self._qkv(inputs_q, inputs_q, True, axes, rotated, rotated)
    # A quantized cache holds K/V in a rotated basis (kvcache.quant): the step attends there
    # (the logits are unchanged) and the context comes back at the end.
    query, key, value = (to_cache_basis(t, cache.quant) for t in (query, key, value))
    sinks = self.sinks[...] if s.attention_sink else None
    with restore_on_error(cache):
      context = cached_attention(self, cache, plan, query, key, value, positions=positions,
                                 model_mode=model_mode, axes=axes, sinks=sinks,
                                 padded=decoder_segment_ids is not None)  # [B, T, N, H]
      record(cache, plan, self.mesh)
    return self._output(from_cache_basis(context, cache.quant), axes, inputs_q)

