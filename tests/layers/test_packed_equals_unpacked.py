"""Packed equals unpacked: a row packing several sequences gives each the outputs and gradients
it has when it runs alone, for every mask kind and every train kernel that runs on CPU.

Chunked attention (Llama 4) is the case with teeth: its chunk boundaries count from each
sequence's first token, so token indices of the row would cut a sequence that does not start
on a multiple of the chunk (the control test shows they do). Layouts therefore put sequences
at unaligned offsets, with padding (segment 0) in the middle and at the end of rows.

Kernels get their mask inputs from `masks.packed_mask_inputs`, as the layer passes them:
kernels that mask by positions (dot_product, blockwise, ring) get each token's index in its
sequence; flash kernels, which mask by token index (splash in TPU interpret mode, the Pallas
GPU kernel in the Pallas interpreter), get token indices, with a chunk mask turned into the
causal mask within `chunk_segment_ids`. Each packed call is compared with the reference
kernel run on every sequence alone: outputs and gradients (q, k, v, sinks) at 1e-5 of the
largest magnitude, float32, MHA and GQA.

The layer tests do the same through `Attention` (chunk mask, RoPE, QK norm, sinks, soft cap;
gradients w.r.t. inputs and parameters), on one device and under shard_map in each length
layout (sharded.py): "split", "ring", and "whole" with a stand-in for splash that masks by
token index, as splash does. They need the layer to pass `packed_mask_inputs` to its kernels.
"""

from __future__ import annotations

import functools

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.kernel_checks import rel_err
from meshattn.layers import Attention, KernelOptions, MaskSpec, dot_product_attention
from meshattn.layers.kernels.train import flash_tpu
from meshattn.layers.kernels.train.blockwise import blockwise_attention
from meshattn.layers.kernels.train.flash_pallas_gpu import pallas_gpu_flash_attention
from meshattn.layers.kernels.train.flash_tpu import splash_attention
from meshattn.layers.kernels.train.ring import ring_attention
from meshattn.layers.masks import (
    chunk_segment_ids, packed_mask_inputs, segment_mask, segment_positions, structural_mask)
from meshattn.sharding import create_mesh, shard_module

TOL = 1e-5
N, H = 4, 16  # the Pallas GPU kernel needs head_dim >= 16
SPECS = {"global": MaskSpec("global"), "local_sliding": MaskSpec("local_sliding", window=3),
         "chunk": MaskSpec("chunk", chunk=4), "full": MaskSpec("full")}


def layout(rows: list[list[int]]) -> np.ndarray:
  """Segment ids [B, L] from per-row run lengths; a negative length is that much padding."""
  out = []
  for runs in rows:
    ids, next_id = [], 1
    for n in runs:
      ids += [0] * -n if n < 0 else [next_id] * n
      next_id += n > 0
    out.append(ids)
  return np.asarray(out, np.int32)


# Row 0: sequences of 5, 7, 3 then padding; row 1: padding in the middle, the second
# sequence starting at 9. With chunk 4 every sequence but one starts off a chunk boundary.
SMALL = layout([[5, 7, 3, -1], [7, -2, 7]])  # [2, 16]
# Flash kernels need 128-multiple (splash) or block-multiple lengths: 128 tokens, chunk 16;
# one row (interpret mode runs the batch one example at a time).
LONG = layout([[45, -3, 50, 30]])  # [1, 128]


def runs_of(ids: np.ndarray):
  """[(row, start, end)] of every non-padding run."""
  out = []
  for b, row in enumerate(ids):
    start = 0
    for t in range(1, len(row) + 1):
      if t == len(row) or row[t] != row[start]:
        if row[start] != 0:
          out.append((b, start, t))
        start = t
  return out


# ---- the helpers ---------------------------------------------------------------------------


def test_segment_positions_and_chunk_pieces_match_a_loop():
  rng = np.random.default_rng(0)
  ids = np.concatenate([SMALL, rng.integers(0, 3, (4, 16)).astype(np.int32)])  # [6, 16]
  pos, pieces = segment_positions(jnp.asarray(ids)), chunk_segment_ids(jnp.asarray(ids), 3)
  want_pos = np.zeros_like(ids)
  want_pieces = np.zeros_like(ids)
  for b, row in enumerate(ids):
    piece = 0
    for t in range(len(row)):
      want_pos[b, t] = 0 if t == 0 or row[t] != row[t - 1] else want_pos[b, t - 1] + 1
      piece += want_pos[b, t] % 3 == 0
      want_pieces[b, t] = piece if row[t] else 0
  np.testing.assert_array_equal(pos, want_pos)
  np.testing.assert_array_equal(pieces, want_pieces)


@pytest.mark.parametrize("kind", list(SPECS))
def test_by_index_inputs_give_the_same_mask(kind):
  """What an index-masked kernel gets (token indices, chunk -> causal within pieces) allows
  exactly the pairs that positions within each sequence allow."""
  ids = jnp.asarray(SMALL)
  masks = []
  for by_index in (False, True):
    spec, pos, seg = packed_mask_inputs(SPECS[kind], ids, by_index=by_index)
    masks.append(structural_mask(spec, pos, pos) & segment_mask(seg, seg))  # [B, T, T]
  np.testing.assert_array_equal(masks[0], masks[1])


# ---- kernels -----------------------------------------------------------------------------


def make_inputs(ids: np.ndarray, kv_heads: int, seed: int = 0):
  b, t = ids.shape
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, t, N, H), jnp.float32)  # [B, T, N, H]
  k = jax.random.normal(ks[1], (b, t, kv_heads, H), jnp.float32)  # [B, T, K, H]
  v = jax.random.normal(ks[2], (b, t, kv_heads, H), jnp.float32)  # [B, T, K, H]
  sinks = jax.random.normal(ks[3], (N,), jnp.float32)  # [N]
  cot = jax.random.normal(ks[4], (b, t, N, H), jnp.float32)  # [B, T, N, H]
  return q, k, v, sinks, cot


def options_for(spec: MaskSpec, mask_mod=None) -> KernelOptions:
  return KernelOptions(mask=spec, scale=H ** -0.5, soft_cap=5.0, mask_mod=mask_mod)


def one_per_row(ids: np.ndarray):
  """Every sequence alone, in one call: (rows, cols) [R, L] gather sequence r into row r at
  positions 0.. (right-padded to the longest) and `alone` [R, L] int32 are its ids there: 1
  on its tokens, 0 on the padding. A sequence starting at 0 has the mask it has alone
  whether or not its row is packed, so this batch is the unpacked reference in one call."""
  runs = runs_of(ids)
  length = max(e - s for _, s, e in runs)
  j = np.arange(length)
  rows = np.asarray([b for b, _, _ in runs])[:, None].repeat(length, 1)  # [R, L]
  real = j < np.asarray([e - s for _, s, e in runs])[:, None]  # [R, L]
  cols = np.where(real, np.asarray([s for _, s, _ in runs])[:, None] + j, 0)  # [R, L]
  return rows, cols, jnp.asarray(real, jnp.int32)


def scatter_back(x, rows, cols, alone, shape):
  """[R, L, ...] per-sequence results -> [B, T, ...] (zeros at padding)."""
  x = jnp.where(alone.reshape(alone.shape + (1,) * (x.ndim - 2)) != 0, x, 0.0)
  return jnp.zeros(shape, x.dtype).at[rows, cols].add(x)


def unpacked(spec: MaskSpec, ids: np.ndarray, mask_mod=None):
  """fn(q, k, v, sinks) -> [B, T, N, H]: the reference kernel on every sequence alone."""
  rows, cols, alone = one_per_row(ids)
  pos = jnp.broadcast_to(jnp.arange(alone.shape[1], dtype=jnp.int32), alone.shape)  # [R, L]

  def fn(q, k, v, sinks):
    ctx, _ = dot_product_attention(q[rows, cols], k[rows, cols], v[rows, cols],
                                   options=options_for(spec, mask_mod), q_positions=pos,
                                   kv_positions=pos, q_segment_ids=alone, kv_segment_ids=alone,
                                   sinks=sinks)  # [R, L, N, H]
    return scatter_back(ctx, rows, cols, alone, q.shape)  # [B, T, N, H]

  return fn


def packed(kernel, spec: MaskSpec, ids: np.ndarray, *, by_index: bool, mask_mod=None):
  """fn(q, k, v, sinks) -> [B, T, N, H]: `kernel` on the packed rows, as the layer calls it."""
  mask_spec, pos, seg = packed_mask_inputs(spec, jnp.asarray(ids), by_index=by_index)

  def fn(q, k, v, sinks):
    return kernel(q, k, v, options=options_for(mask_spec, mask_mod), q_positions=pos,
                  kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks)[0]

  return fn


def values_and_grads(fn, q, k, v, sinks, cot):
  """(output, (dq, dk, dv, dsinks)) of sum(output * cot), in one jit."""

  @jax.jit
  def run(q, k, v, sinks):
    out, vjp = jax.vjp(fn, q, k, v, sinks)
    return out, vjp(cot)

  return run(q, k, v, sinks)


@functools.cache
def reference(kind: str, kv_heads: int, long: bool):
  """What each sequence gives alone (the long rows: chunk 16, for the flash kernels)."""
  ids = LONG if long else SMALL
  q, k, v, sinks, cot = make_inputs(ids, kv_heads)
  spec = MaskSpec("chunk", chunk=16) if long else SPECS[kind]
  return jax.tree.map(np.asarray, values_and_grads(unpacked(spec, ids), q, k, v, sinks, cot))


def assert_matches(got, want, what: str):
  (out, grads), (ref_out, ref_grads) = got, want
  assert rel_err(out, ref_out) <= TOL, f"{what}: output {rel_err(out, ref_out):.2g}"
  for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all(), f"{what}: {name} not finite"
    assert rel_err(g, r) <= TOL, f"{what}: {name} {rel_err(g, r):.2g}"


POSITION_KERNELS = {
    "dot_product": dot_product_attention,
    # Tiles of 4 cross sequence, chunk and padding boundaries.
    "blockwise": functools.partial(blockwise_attention, block_q=4, block_kv=4),
    "ring": ring_attention,  # one ring step here; split over shards in the layer tests
}


# Every kind; chunk (the kind packing changes) with MHA and GQA, the others with one of them.
KINDS_HEADS = [("global", 4), ("local_sliding", 2), ("chunk", 4), ("chunk", 2), ("full", 2)]


@pytest.mark.parametrize("kind,kv_heads", KINDS_HEADS,
                         ids=[f"{k}-{'mha' if h == N else 'gqa'}" for k, h in KINDS_HEADS])
@pytest.mark.parametrize("name", list(POSITION_KERNELS))
def test_position_kernels(name, kind, kv_heads):
  q, k, v, sinks, cot = make_inputs(SMALL, kv_heads)
  fn = packed(POSITION_KERNELS[name], SPECS[kind], SMALL, by_index=False)
  assert_matches(values_and_grads(fn, q, k, v, sinks, cot), reference(kind, kv_heads, False),
                 f"{name}/{kind}")


def _not_second_token(batch, head, q_idx, kv_idx):
  return (kv_idx != 1) | (q_idx == kv_idx)  # a rule on positions, not on their differences


@pytest.mark.parametrize("name", ["dot_product", "blockwise"])
def test_mask_mod_sees_positions_in_its_sequence(name):
  """score_mod / mask_mod hooks get q_idx / kv_idx counted in each sequence, as alone."""
  q, k, v, sinks, cot = make_inputs(SMALL, 2)
  fn = packed(POSITION_KERNELS[name], SPECS["global"], SMALL, by_index=False,
              mask_mod=_not_second_token)
  ref = unpacked(SPECS["global"], SMALL, mask_mod=_not_second_token)
  assert_matches(values_and_grads(fn, q, k, v, sinks, cot),
                 values_and_grads(ref, q, k, v, sinks, cot), f"{name}/mask_mod")


def test_token_index_chunks_differ_from_unpacked():
  """Control: the old train-mode inputs (token index of the row) cut packed sequences at the
  row's chunk boundaries, so the property above is not vacuous."""
  q, k, v, sinks, cot = make_inputs(SMALL, 2)
  idx = jnp.broadcast_to(jnp.arange(SMALL.shape[1], dtype=jnp.int32), SMALL.shape)  # [B, T]
  seg = jnp.asarray(SMALL)
  out, _ = dot_product_attention(q, k, v, options=options_for(SPECS["chunk"]), q_positions=idx,
                                 kv_positions=idx, q_segment_ids=seg, kv_segment_ids=seg,
                                 sinks=sinks)
  assert rel_err(out, reference("chunk", 2, False)[0]) > 0.1


def _splash(*args, **kwargs):
  return splash_attention(*args, interpret=True, **kwargs)


def _pallas_gpu(*args, **kwargs):
  return pallas_gpu_flash_attention(*args, interpret=True, block_q=32, block_kv=32,
                                    block_q_bwd=32, block_kv_bwd=32, **kwargs)


# Interpret mode costs seconds per call: the chunk mask only. The other kinds give these
# kernels the inputs they had before (token indices, the ids), whose masks equal the
# per-sequence ones (test_by_index_inputs_give_the_same_mask), and the kernels' own tests
# compare them with the reference on such inputs.
@pytest.mark.parametrize("name,kernel", [("splash", _splash), ("pallas_gpu", _pallas_gpu)],
                         ids=["splash", "pallas_gpu"])
def test_index_masked_flash_kernels_chunk(name, kernel):
  q, k, v, sinks, cot = make_inputs(LONG, 2)
  fn = packed(kernel, MaskSpec("chunk", chunk=16), LONG, by_index=True)
  assert_matches(values_and_grads(fn, q, k, v, sinks, cot), reference("chunk", 2, True),
                 f"{name}/chunk")


# ---- the layer ---------------------------------------------------------------------------

EMB = 32
AXES = ("data", "fsdp", "context", "tensor", "autoregressive")


def build(kv_heads: int, mesh=None, **kw) -> Attention:
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=N,
                   num_kv_heads=kv_heads, head_dim=H, mask=SPECS["chunk"], attention_sink=True,
                   attn_logits_soft_cap=5.0, use_qk_norm=True, **kw)


def layer_out_and_grads(model, x, ids: np.ndarray, *, packed: bool):
  """[out [B, T, D], d/dx, d/dparams...] of sum(out * cot): the packed rows, or every
  sequence alone (`one_per_row`: positions 0..), zeros at padding."""
  cot = jax.random.normal(jax.random.key(5), x.shape)  # [B, T, D]
  seg = jnp.asarray(ids)
  pos = segment_positions(seg)  # [B, T]: RoPE restarts with each sequence

  def forward(model, x):
    if packed:
      return model(x, inputs_positions=pos, decoder_segment_ids=seg)  # [B, T, D]
    rows, cols, alone = one_per_row(ids)
    out = model(x[rows, cols], decoder_segment_ids=alone)  # [R, L, D]
    return scatter_back(out, rows, cols, alone, x.shape)  # [B, T, D]

  @nnx.jit
  def step(model, x):
    def loss(model, x):
      out = forward(model, x)
      return jnp.sum(out * cot), out
    return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)

  (_, out), (g_model, g_x) = step(model, x)
  return [out, g_x] + jax.tree.leaves(nnx.state(g_model, nnx.Param))


def layer_inputs():
  return jax.random.normal(jax.random.key(1), SMALL.shape + (EMB,))  # [B, T, D]


@functools.cache
def layer_reference():
  model = build(2)
  return jax.tree.map(np.asarray, layer_out_and_grads(model, layer_inputs(), SMALL, packed=False))


def mesh_of(**sizes):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  return create_mesh({"mesh_axes": AXES, **{f"ici_{a}_parallelism": sizes.get(a, 1) for a in AXES}})


def index_masked_stand_in(query, key, value, *, q_positions, kv_positions, interpret=False,
                          **kwargs):
  """Stands in for splash in the layer: masks by token index whatever positions it is given,
  as splash does (and as splash checks for concrete positions), on the reference math."""
  del interpret
  idx = lambda p: jnp.broadcast_to(jnp.arange(p.shape[-1], dtype=jnp.int32), p.shape)
  return dot_product_attention(query, key, value, q_positions=idx(q_positions),
                               kv_positions=idx(kv_positions), **kwargs)


# kernel, mesh sizes (None: one device). Chunk mask, GQA (MHA: the kernel tests).
LAYER_CASES = {
    "dot_product": ("dot_product", None),
    # shard_map splits the query length: the positions split like the ids.
    "blockwise-d2c2t2": ("blockwise", dict(data=2, context=2, tensor=2)),
    # K/V split too: the positions travel around the ring with their block.
    "ring-d2c4": ("ring", dict(data=2, context=4)),
    # A kernel masking by token index ("whole" layout) must get token indices and the chunk
    # mask as causal within pieces: splash, replaced by a stand-in that masks by index (real
    # splash in interpret mode: test_index_masked_flash_kernels_chunk; it hangs under a
    # multi-device shard_map under pytest, test_kernel_dispatch.py).
    "flash-d2c2t2": ("flash", dict(data=2, context=2, tensor=2)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_packed_equals_unpacked(case, monkeypatch):
  kernel, sizes = LAYER_CASES[case]
  mesh = None if sizes is None else mesh_of(**sizes)
  extra = {}
  if kernel == "flash":
    monkeypatch.setattr(flash_tpu, "splash_attention", index_masked_stand_in)
    # The stand-in tiles any length; real splash needs multiples of 128 (its registry limit).
    from meshattn.layers.kernels import registry
    monkeypatch.setattr(registry, "_REGISTRY", [
        dataclasses.replace(k, limits=registry.Limits()) if k.impl.endswith(":splash_attention")
        else k for k in registry._REGISTRY])
    extra = dict(pallas_interpret=True)
  model = build(2, mesh, attention=kernel, **extra)
  if mesh is not None:
    shard_module(model, mesh, model.settings.logical_axis_rules)
  got = layer_out_and_grads(model, layer_inputs(), SMALL, packed=True)
  for i, (g, w) in enumerate(zip(got, layer_reference())):
    what = ["output", "d/dx"][i] if i < 2 else f"param grad {i - 2}"
    assert rel_err(g, w) <= TOL, f"{case}: {what} {rel_err(g, w):.2g}"
