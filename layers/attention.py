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

import contextlib
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from meshattn.configs.vocabulary import DECODE_KERNELS, TRAIN_KERNELS
from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.quant import from_cache_basis, to_cache_basis
from meshattn.kvcache.state import LinearStateCache
from meshattn.layers.cached_step import cached_attention, step_positions
from meshattn.layers.kernels import dispatch
from meshattn.layers.kernels.train.flax_fn import call_flax_attention_fn
from meshattn.layers.linear.steps import check_linear_call, linear_cached_step, linear_train
from meshattn.layers.masks import packed_mask_inputs
from meshattn.layers.output_gate import make_output_gate
from meshattn.layers.positions import flatten_positions, temperature_tune
from meshattn.layers.projections import DenseGeneral, make_qk_norm
from meshattn.layers.quantization import projection_dot_general
from meshattn.layers.rope import apply_rope
from meshattn.layers.settings import MODEL_MODES, AttentionSettings
from meshattn.layers.serving import structure_changed
from meshattn.layers.step_inputs import plan_step, record
from meshattn.sharding import constrain

KNOWN_KERNELS: tuple[str, ...] = TRAIN_KERNELS


class Attention(nnx.Module):
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
    self.cache: KVCache | None = nnx.data(None)  # created by init_cache

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
                 ring_buffer: bool | None = None, paged: bool | None = None) -> KVCache | PagedKVCache:
    """Create this layer's KV cache for `batch_size` slots of up to `max_length` tokens.

    Layout: `ar_cache_axis_order`, or `prefill_cache_axis_order` when
    `for_prefill` (a cache whose sequences are later `insert`ed into a decode
    cache). Sliding-window layers get a ring buffer of `sliding_window_size`
    entries unless `ring_buffer=False` (or `sliding_window_ring_buffer: false`).
    `paged` (default `paged_kv_cache`) builds a PagedKVCache of `num_pages`
    pages of `tokens_per_page` tokens instead; its pages are reserved on the
    host with `cache.reserve_for_step(slots, tokens)` before each step.
    """
    s = self.settings
    structure_changed()  # serving steps bound to this module must split it again
    if s.linear is not None:  # a linear-attention layer keeps a state per slot, not K/V
      self.cache = LinearStateCache(batch_size, max_length or s.max_target_length, s.num_kv_heads,
                                    s.head_dim, mesh=self.mesh, rules=s.logical_axis_rules,
                                    axis_names=s.cache_axis_names)
      return self.cache
    if s.paged_kv_cache if paged is None else paged:
      self.cache = PagedKVCache(
          batch_size, max_length or s.max_target_length, s.num_kv_heads, s.head_dim,
          num_pages=s.num_pages, tokens_per_page=s.tokens_per_page, dtype=s.dtype,
          quant=s.kv_quant, mesh=self.mesh, rules=s.logical_axis_rules, axis_names=s.cache_axis_names)
      return self.cache
    ring = s.sliding_window_ring_buffer if ring_buffer is None else ring_buffer
    window = s.mask.window if s.mask.attention_type == "local_sliding" and ring else None
    self.cache = KVCache(
        batch_size, max_length or s.max_target_length, s.num_kv_heads, s.head_dim, dtype=s.dtype,
        axis_order=s.prefill_cache_axis_order if for_prefill else s.ar_cache_axis_order,
        window=window, quant=s.kv_quant, mesh=self.mesh, rules=s.logical_axis_rules,
        axis_names=s.cache_axis_names)
    return self.cache

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
    unsupported = {"inputs_kv (cross-attention)": inputs_kv is not None and inputs_kv is not inputs_q,
                   "inputs_v": inputs_v is not None,
                   "inputs_kv_positions": inputs_kv_positions is not None,
                   "kv_segment_ids": kv_segment_ids is not None, "mask": mask is not None,
                   "bias": bias is not None, "sow_weights": sow_weights,
                   "attention_fn": self.settings.attention_fn is not None,
                   "dropout (deterministic=False)": not deterministic and self.settings.dropout_rate > 0}
    bad = [name for name, on in unsupported.items() if on]
    if bad:
      raise ValueError(f"model_mode={model_mode!r} does not support {bad}; they apply to train mode")
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
    self_attention = (inputs_kv is None or inputs_kv is inputs_q) and inputs_v is None
    if inputs_kv is None:
      inputs_kv = inputs_q
    if inputs_q.ndim < 3 or inputs_kv.ndim != inputs_q.ndim:
      raise ValueError(f"inputs_q {inputs_q.shape} and inputs_kv {inputs_kv.shape} must be "
                       "[batch..., length, features] with the same batch dims")
    batch_shape = inputs_q.shape[:-2]
    if inputs_kv.shape[:-2] != batch_shape:
      raise ValueError(f"inputs_kv batch dims {inputs_kv.shape[:-2]} != inputs_q batch dims {batch_shape}")
    if inputs_v is not None and inputs_v.shape[:-1] != inputs_kv.shape[:-1]:
      raise ValueError(f"inputs_v {inputs_v.shape} must match inputs_kv {inputs_kv.shape} "
                       "but for the features")
    q_len, kv_len = inputs_q.shape[-2], inputs_kv.shape[-2]
    batch = math.prod(batch_shape)

    def flat(x, trailing):  # [batch..., *trailing] (leading dims broadcast) -> [B, *trailing]
      if x is None:
        return None
      x = jnp.broadcast_to(x, batch_shape + x.shape[x.ndim - trailing:])
      return x.reshape((batch,) + x.shape[len(batch_shape):])

    x_q = flat(inputs_q, 2)  # [B, T, D]
    x_kv = x_q if self_attention else flat(inputs_kv, 2)  # [B, S, D_kv]
    x_v = flat(inputs_v, 2)  # [B, S, D_kv] or None
    q_idx = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))  # [B, T]
    kv_idx = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))  # [B, S]
    streams = s.num_position_streams
    q_pos = flatten_positions(inputs_positions, batch_shape, streams, "inputs_positions")
    q_pos = q_idx if q_pos is None else q_pos  # [B, T] or MRoPE [n, B, T]
    kv_pos = flatten_positions(inputs_kv_positions, batch_shape, streams, "inputs_kv_positions")
    if kv_pos is None:
      # Decided by shape, not identity: under jit the same array passed twice
      # arrives as two tracers.
      kv_pos = q_pos if kv_len == q_len else kv_idx
    for name, ids, want in (("decoder_segment_ids", decoder_segment_ids, q_len),
                            ("kv_segment_ids", kv_segment_ids, kv_len)):
      if ids is not None and (jnp.ndim(ids) < 1 or jnp.shape(ids)[-1] != want):
        raise ValueError(f"{name} has shape {jnp.shape(ids)}; its last axis must be the "
                         f"{'query' if name[0] == 'd' else 'key'} length {want} ([batch..., {want}])")
    q_seg = flat(decoder_segment_ids, 1)  # [B, T]
    kv_seg = flat(kv_segment_ids, 1) if kv_segment_ids is not None else q_seg  # [B, S]
    if q_seg is not None and kv_seg.shape[-1] != kv_len:
      raise ValueError(f"cross-attention (key length {kv_len} != query length {q_len}) with "
                       "decoder_segment_ids also needs kv_segment_ids [batch..., S]")
    user_mask = _flatten_pairwise(mask, batch_shape, batch)
    user_bias = _flatten_pairwise(bias, batch_shape, batch)

    axes = s.axes["train"]
    if s.linear is not None:
      check_linear_call(self_attention_length=kv_len == q_len, mask=mask, bias=bias,
                        sow_weights=sow_weights, kv_segment_ids=kv_segment_ids)
    query, key, value = self._qkv(x_q, x_kv, self_attention, axes, q_pos, kv_pos, x_v)
    dropout_rng = None
    if s.dropout_rate > 0 and not deterministic:
      stream = rngs if rngs is not None else self.rngs
      dropout_rng = stream.dropout()
    sinks = self.sinks[...] if s.attention_sink else None
    # The structural mask runs on token index in train mode (positions only rotate).
    kernel_args = dict(options=dispatch.kernel_options(s), q_positions=q_idx, kv_positions=kv_idx,
                       q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=sinks, mask=user_mask,
                       bias=user_bias, dropout_rng=dropout_rng, deterministic=deterministic)

    def packed_args(by_index: bool) -> dict:
      # Packed rows (one ids array for queries and keys): each sequence gets the mask it has
      # alone, chunks counted from its first token (masks.packed_mask_inputs).
      if q_seg is None or kv_segment_ids is not None:
        return kernel_args
      spec, pos, seg = packed_mask_inputs(s.mask, q_seg, by_index=by_index)
      return dict(kernel_args, options=dataclasses.replace(kernel_args["options"], mask=spec),
                  q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

    if s.linear is not None:
      context, weights = linear_train(query, key, value, spec=s.linear, scale=s.scale,
                                      segment_ids=q_seg, precision=s.precision, mesh=self.mesh,
                                      rules=s.logical_axis_rules, axes=axes), None
    elif s.attention_fn is not None:
      context, weights = call_flax_attention_fn(s.attention_fn, query, key, value, dtype=s.dtype,
                                                precision=s.precision, **packed_args(False))
    else:
      dropout_on = dropout_rng is not None
      features = dispatch.call_features(s, "train", segments=q_seg is not None,
                                        mask=user_mask is not None, bias=user_bias is not None,
                                        dropout=dropout_on, weights=sow_weights)
      kernel, layout = self._kernel_fn("train", features, (q_len, kv_len))
      # Explicit partitioning; dropout and sown weights run auto-sharded
      # instead (one shard's RNG stream would repeat on every shard).
      context, weights = self._call_kernel(kernel, axes, query, key, value,
                                           shard=not dropout_on and not sow_weights,
                                           layout=layout, return_weights=sow_weights,
                                           **packed_args(layout == "whole"))
    if sow_weights and weights is not None:
      self.sow(nnx.Intermediate, "attention_weights", weights.reshape(batch_shape + weights.shape[1:]))
    out = self._output(context, axes, x_q)  # [B, T, D_out]
    return out.reshape(batch_shape + out.shape[1:])

  def _cached(self, inputs_q, inputs_positions, decoder_segment_ids, *, model_mode, slots):
    s = self.settings
    cache = self.cache
    if cache is None:
      raise ValueError(f"model_mode={model_mode!r} needs a KV cache: call init_cache(batch_size, "
                       "max_length) first")
    # Checked once for the whole call (every chunk included) before anything is written.
    plan = plan_step(s, cache, inputs_q, decoder_segment_ids, slots, model_mode)
    batch, length = inputs_q.shape[:2]
    positions = step_positions(cache, jnp.clip(plan.rows, 0, cache.batch_size - 1), length)  # [B, T]
    rope_positions = positions
    if inputs_positions is not None:  # [B, T], or MRoPE streams [n, B, T]
      rope_positions = flatten_positions(jnp.asarray(inputs_positions), (batch,),
                                         s.num_position_streams, "inputs_positions")
      if rope_positions.shape[-1] != length:
        raise ValueError(f"inputs_positions has shape {inputs_positions.shape}: its last axis "
                         f"must be the input length {length}")

    axes = s.axes[model_mode]
    query, key, value = self._qkv(inputs_q, inputs_q, True, axes, rope_positions, rope_positions)
    # A quantized cache holds K/V in a rotated basis (kvcache.quant): the step attends there
    # (the logits are unchanged) and the context comes back at the end.
    query, key, value = (to_cache_basis(t, cache.quant) for t in (query, key, value))
    sinks = self.sinks[...] if s.attention_sink else None
    with _restore_on_error(cache):
      if s.linear is not None:
        context = linear_cached_step(cache, plan.rows, query, key, value, valid=plan.valid,
                                     spec=s.linear, scale=s.scale, precision=s.precision,
                                     mesh=self.mesh, rules=s.logical_axis_rules, axes=axes)
      else:
        context = cached_attention(self, cache, plan, query, key, value, positions=positions,
                                   model_mode=model_mode, axes=axes, sinks=sinks,
                                   padded=decoder_segment_ids is not None)  # [B, T, N, H]
      record(cache, plan, self.mesh)
    return self._output(from_cache_basis(context, cache.quant), axes, inputs_q)


@contextlib.contextmanager
def _restore_on_error(cache):
  """Put the cache back as it was if an eager step fails part-way (state
  updates under jit are only applied on success anyway)."""
  saved = jax.tree.map(lambda x: x, nnx.state(cache))  # new Variables over the same (immutable) arrays
  try:
    yield
  except Exception:
    nnx.update(cache, saved)
    raise


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
