"""Decode kernels' GPU split-K (flash-decoding) layouts, int8 / int4 scale placement and
length-aware splits: Pallas (interpret mode) vs reference vs float64 NumPy.

Shapes, inputs and the NumPy attention are shared with test_decode_kernels.py
(tests/helpers/decode_inputs.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head
from meshattn.layers.kernels.decode import decode_common, decode_splits
from meshattn.layers.kernels.decode import ragged as ragged_mod
from meshattn.layers.kernels.decode.paged import (auto_pages_per_block, paged_decode_pallas,
                                                   paged_decode_reference)
from meshattn.layers.kernels.decode.ragged import ragged_decode_pallas, ragged_decode_reference

from helpers.decode_inputs import (
    BACKENDS, BLOCK, H, LENGTHS, MAX_PAGES, N, PAGED_LENGTHS, S, SCALE, TOL, TPP,
    attention_np, check_ragged_pallas, numpy_for, paged_inputs, poison_past_lengths, ragged_inputs,
    ragged_visible_np)


# ---- split-K (flash-decoding) GPU variants ------------------------------------------------
# BLOCK=8 over S=36 gives 5 blocks: 3 splits are 2 blocks each (the full row's
# last one 1 block), 8 splits become 5 splits of one block; shorter rows leave
# their later splits empty, and the rows of length 1 and 0 have at most one
# non-empty split.

SPLIT_CASES = [("plain", 3), ("window", 3), ("soft_cap", 8), ("sinks", 3), ("int8", 8),
               ("int8_token", 3), ("all", 3), ("all", 8), ("all_float", 2)]


@pytest.mark.parametrize("case, num_splits", SPLIT_CASES,
                         ids=[f"{c}-p{p}" for c, p in SPLIT_CASES])
def test_ragged_split_vs_reference(case, num_splits):
  out = check_ragged_pallas(case, 2, seed=11, num_splits=num_splits)
  np.testing.assert_array_equal(np.asarray(out)[0], 0.0)  # the row of length 0


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_ragged_split_heads_and_bfloat16(kv_heads):
  q, k, v, kwargs, _ = ragged_inputs("all_float", kv_heads, dtype=jnp.bfloat16)
  lengths = jnp.asarray(LENGTHS)
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             num_splits=4)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["all_float", "int8_token"])
def test_ragged_split_ignores_entries_past_length(case):
  """NaN / garbage past each row's length reaches no split's partials."""
  q, k, v, kwargs, _ = ragged_inputs(case, 2)
  lengths = jnp.asarray(LENGTHS)
  clean = ragged_decode_reference(q, k, v, lengths, **kwargs)
  k, v, kwargs = poison_past_lengths(k, v, kwargs, lengths)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=BLOCK, interpret=True,
                             num_splits=3)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(clean), **TOL)


PAGED_SPLIT_CASES = [("plain", 1, 2), ("sinks", 2, 3), ("int8", None, 2), ("int8_token", 1, 5),
                     ("all", 1, 3), ("all", 2, 8), ("all_float", None, 2)]


@pytest.mark.parametrize("case, pages_per_block, num_splits", PAGED_SPLIT_CASES,
                         ids=[f"{c}-ppb{b}-p{p}" for c, b, p in PAGED_SPLIT_CASES])
def test_paged_split_vs_reference(case, pages_per_block, num_splits):
  """Shuffled pages, with NaN in unowned pages and past each row's length (garbage=True)."""
  arrays, kwargs, np_inputs = paged_inputs(case, 2, seed=13, garbage=True)
  out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=pages_per_block, interpret=True,
                            num_splits=num_splits)
  assert np.all(np.isfinite(np.asarray(out)))
  expected = numpy_for(case, np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)
  np.testing.assert_array_equal(np.asarray(out)[0], 0.0)


def test_split_bounds_cover_each_rows_blocks_once():
  """Fixed-size splits from the row's first block: disjoint, covering [first, last), in order."""
  for first, last in [(0, 0), (0, 1), (0, 5), (2, 5), (3, 40), (7, 7)]:
    for bps in (1, 2, 3, 8, 64):
      num_splits = -(-max(last - first, 1) // bps)
      starts, ends = (np.asarray(x) for x in decode_common.split_bounds(
          jnp.int32(first), jnp.int32(last), jnp.arange(num_splits), bps))
      assert np.all(ends - starts <= bps)
      seen = [j for start, end in zip(starts, ends) for j in range(start, end)]
      assert seen == list(range(first, last)), (first, last, bps, seen)
      ne = decode_splits.split_nonempty(jnp.array([first]), jnp.array([last]), num_splits + 2, bps)
      assert int(ne.sum()) == -(-(last - first) // bps)  # one program per bps blocks, no more


def test_auto_num_splits():
  """Fills ~PROGRAMS_PER_SM programs per SM; never splits below MIN_BLOCKS_PER_SPLIT blocks."""
  auto = decode_splits.auto_num_splits
  per_sm, min_blocks = decode_splits.PROGRAMS_PER_SM, decode_splits.MIN_BLOCKS_PER_SPLIT
  assert auto(8 * 8, 256, cores=132) == min(-(-per_sm * 132 // 64), 256 // min_blocks)  # b8 kv32768
  assert auto(64 * 8, 32, cores=132) == min(-(-per_sm * 132 // 512), 32 // min_blocks)
  assert auto(100_000, 256, cores=132) == 1  # the grid already fills the GPU
  assert auto(1, 2, cores=132) == 1  # too short to split


def test_split_layout():
  layout = decode_splits.split_layout
  assert layout(999, programs=1, num_splits=None, blocks_per_split=None, interpret=True) == (999, 1)
  assert layout(5, programs=1, num_splits=3, blocks_per_split=None, interpret=False) == (2, 3)
  assert layout(5, programs=1, num_splits=8, blocks_per_split=None, interpret=False) == (1, 5)
  assert layout(5, programs=1, num_splits=None, blocks_per_split=2, interpret=True) == (2, 3)
  assert layout(5, programs=1, num_splits=None, blocks_per_split=50, interpret=True) == (5, 1)
  bps, splits = layout(256, programs=64, num_splits=None, blocks_per_split=None, interpret=False)
  assert splits * bps >= 256 and splits == -(-256 // bps) and bps >= decode_splits.MIN_BLOCKS_PER_SPLIT
  for bad in (dict(num_splits=0), dict(blocks_per_split=0), dict(num_splits=2, blocks_per_split=2)):
    kwargs = dict(num_splits=None, blocks_per_split=None) | bad
    with pytest.raises(ValueError, match="num_splits|blocks_per_split"):
      layout(5, programs=1, interpret=True, **kwargs)


def test_ragged_max_blocks_bounds_every_row():
  """The split grid's extent covers the visible blocks of every length <= capacity, any window."""
  for window in (None, 1, 5, 8, 9, 100):
    for block in (4, 8):
      bound = ragged_mod.ragged_max_blocks(S, block, window)
      for n in range(S + 1):
        _, first, last = ragged_mod.ragged_row_blocks(jnp.int32(n), block, window)
        assert int(last) - int(first) <= bound, (window, block, n)


def test_auto_tile_keeps_shared_memory_per_step():
  """Tiles are sized in the dots' dtype: int8 is staged as the query dtype, so it gets the keys of
  bfloat16; float32 half of them."""
  tile, itemsize = decode_common.auto_tile_keys, decode_common.compute_itemsize
  assert itemsize(jnp.bfloat16, jnp.int8) == 2 and itemsize(jnp.float32, jnp.int8) == 4
  assert itemsize(jnp.bfloat16, jnp.bfloat16) == 2 and itemsize(jnp.float32, jnp.bfloat16) == 4
  assert tile(128, 2) == 128 and tile(128, 4) == 64 and tile(64, 2) == 256
  assert tile(16, 1) == 512 and tile(1024, 4) == 16  # clamped to [16, 512]


# ---- int8 scales applied to logits / probabilities (GPU) ---------------------------------


INT8_CASES = [(axis, dtype, block, splits) for axis in ("dkv", "heads_and_dkv")
              for dtype, block, splits in ((jnp.float32, 16, 1), (jnp.bfloat16, None, 3))]


@pytest.mark.parametrize("axis, dtype, block_kv, num_splits", INT8_CASES,
                         ids=[f"{a}-{jnp.dtype(d).name}-bk{b}-p{p}" for a, d, b, p in INT8_CASES])
def test_ragged_int8_scales_after_the_dot(axis, dtype, block_kv, num_splits):
  """Per-token (dkv: per token and head; heads_and_dkv: per token) scales on the logits and
  probabilities give the reference's dequantized attention; rows 0, 1, full, mixed."""
  rng = np.random.default_rng(21)
  kv_heads, cap = 2, 80
  lengths = jnp.asarray([0, 1, cap, 37, 64, 5], jnp.int32)
  q = jnp.asarray(rng.normal(size=(len(lengths), N, H)), dtype)
  # Scales spanning two orders of magnitude across tokens: a misplaced or
  # transposed scale shows.
  spread = np.exp(rng.uniform(-2.5, 2.5, size=(len(lengths), cap, kv_heads, 1)))
  quant = KVQuant("int8", axis)
  k, ks = quantize(jnp.asarray(rng.normal(size=(len(lengths), cap, kv_heads, H)) * spread), quant)
  v, vs = quantize(jnp.asarray(rng.normal(size=(len(lengths), cap, kv_heads, H)) * spread), quant)
  kwargs = dict(scale=SCALE, soft_cap=3.0, key_scale=scales_by_head(ks),
                value_scale=scales_by_head(vs))
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=block_kv, interpret=True,
                             num_splits=num_splits)
  tol = TOL if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)
  np.testing.assert_array_equal(np.asarray(out, np.float32)[0], 0.0)


def test_paged_int8_scales_after_the_dot():
  """The paged kernel's int8 path (scales per token and head), several pages per step, split."""
  for case in ("int8", "int8_token"):
    arrays, kwargs, np_inputs = paged_inputs(case, 2, seed=17)
    out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=2, interpret=True,
                              blocks_per_split=1)
    expected = numpy_for(case, np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
    np.testing.assert_allclose(np.asarray(out), expected, **TOL)


INT4_CASES = [("dkv", jnp.float32, 1), ("heads_and_dkv", jnp.float32, 2), ("dkv", jnp.bfloat16, 3)]


@pytest.mark.parametrize("axis, dtype, num_splits", INT4_CASES,
                         ids=[f"{a}-{jnp.dtype(d).name}-p{p}" for a, d, p in INT4_CASES])
def test_ragged_int4_gpu_kernel(axis, dtype, num_splits):
  """int4 K/V (GPU kernel only): the same scale placement, against the reference.

  On a GPU the compiled Triton kernel runs (what the layer dispatches to), in tiles of 16 keys
  under a 16-bit query (8-key tiles are refused there: see test_small_16bit_tiles_refused).
  Interpret mode on the GPU backend read int4 V's odd head-dim elements as zero (jax 0.11.2,
  H200): a discrepancy of the interpreter's int4 slicing there, not of the kernel."""
  q, k, v, _, _ = ragged_inputs("plain", 2, seed=31, dtype=dtype)
  quant = KVQuant("int4", axis)
  k4, ks = quantize(k, quant)
  v4, vs = quantize(v, quant)
  lengths = jnp.asarray(LENGTHS)
  kwargs = dict(scale=SCALE, soft_cap=2.0, window=20, key_scale=scales_by_head(ks),
                value_scale=scales_by_head(vs))
  ref = ragged_decode_reference(q, k4, v4, lengths, **kwargs)
  on_gpu = jax.default_backend() == "gpu"
  block = 16 if on_gpu else BLOCK
  out = ragged_decode_pallas(q, k4, v4, lengths, **kwargs, block_kv=block,
                             interpret=not on_gpu, num_splits=num_splits)
  tol = TOL if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)


@pytest.mark.parametrize("query_dtype, kv_dtype, refused", [
    (jnp.bfloat16, jnp.bfloat16, True), (jnp.float16, jnp.int8, True),
    (jnp.bfloat16, jnp.int4, True), (jnp.float32, jnp.int4, False),
    (jnp.bfloat16, jnp.float32, False)])  # float32 dots
def test_small_16bit_tiles_refused(query_dtype, kv_dtype, refused):
  """Compiled GPU tiles of 8 keys under 16-bit dots gave exactly twice the reference on the
  H200 (any K/V dtype): refused naming the tile, before anything is lowered; the automatic
  tiles never go below 16 keys (the paged kernel's too, when its pages are small)."""
  problem = decode_common.tile_keys_problem(8, query_dtype, kv_dtype)
  assert (problem is not None) == refused
  assert decode_common.tile_keys_problem(16, query_dtype, kv_dtype) is None
  if not refused:
    return
  assert auto_pages_per_block(128, 8, 1, query_dtype, kv_dtype) * 8 == 16  # one 8-token page
  assert auto_pages_per_block(128, 4, 2, query_dtype, kv_dtype) * 4 == 16
  q, k, v, _, _ = ragged_inputs("plain", 2, seed=31, dtype=jnp.float32)
  q, k, v = q.astype(query_dtype), k.astype(kv_dtype), v.astype(kv_dtype)  # values unused
  with pytest.raises(ValueError, match=r"block_kv=8: 8 keys per tile under 16-bit dots"):
    ragged_mod._ragged_gpu(q, k, v, jnp.asarray(LENGTHS), scale=SCALE, soft_cap=None,
                           window=None, sinks=None, key_scale=None, value_scale=None, block_kv=8,
                           interpret=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_ragged_int4_triton_module_casts_through_int8(dtype, monkeypatch):
  """The Triton module the GPU kernel lowers to (lowered for CUDA on any machine) widens the
  unpacked int4 tiles to int8 and never casts int4 straight to a float (int8's casts and
  dots are the ones verified on the H200). Fails if the widening is removed."""
  registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
  if not hasattr(getattr(registration, "lowering", None), "lower_jaxpr_to_triton_module"):
    pytest.skip("this jax lowers Pallas Triton kernels through another (private) function")
  lower = registration.lowering.lower_jaxpr_to_triton_module
  modules = []

  def keep_text(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", keep_text)
  q, k, v, _, _ = ragged_inputs("plain", 2, seed=31, dtype=dtype)
  k4, ks = quantize(k, KVQuant("int4"))
  v4, vs = quantize(v, KVQuant("int4"))
  call = lambda *a: ragged_mod._ragged_gpu(  # noqa: E731
      *a[:4], scale=SCALE, soft_cap=None, window=None, sinks=None, key_scale=a[4],
      value_scale=a[5], block_kv=16, interpret=False, num_splits=1)
  operands = (q, k4, v4, jnp.asarray(LENGTHS), scales_by_head(ks), scales_by_head(vs))
  jax.jit(call).trace(*operands).lower(lowering_platforms=("cuda",))
  (text,) = modules
  assert "arith.trunci" in text and "xi4>" in text  # the nibbles are unpacked in the kernel
  assert text.count("arith.extsi") >= 2 and "xi4> to tensor<16x16xi8>" in text  # K and V
  assert not any("sitofp" in line and "xi4> to" in line for line in text.splitlines())


def test_int4_refused_where_no_kernel_path():
  """The TPU ragged kernel and the paged kernels take no int4 (the reference does)."""
  q, k, v, _, _ = ragged_inputs("plain", 2)
  k4, ks = quantize(k, KVQuant("int4"))
  v4, vs = quantize(v, KVQuant("int4"))
  with pytest.raises(NotImplementedError, match="int4"):
    ragged_decode_pallas(q, k4, v4, jnp.asarray(LENGTHS), scale=SCALE,
                         key_scale=scales_by_head(ks), value_scale=scales_by_head(vs),
                         interpret=True, backend="tpu")
  (q, key_pages, _, table, lengths), kwargs, _ = paged_inputs("plain", 2)
  pk, pks = quantize(key_pages, KVQuant("int4"))
  with pytest.raises(NotImplementedError, match="int4"):
    paged_decode_pallas(q, pk, pk, table, lengths, page_owner=kwargs["page_owner"],
                        slots=kwargs["slots"], scale=SCALE, key_scale=pks, value_scale=pks,
                        interpret=True)


# ---- length-aware split layout --------------------------------------------------------


LENGTH_AWARE_CASES = [(1, None), (3, None), (2, 5), (1, 11)]


@pytest.mark.parametrize("blocks_per_split, window", LENGTH_AWARE_CASES,
                         ids=[f"bps{b}-window{w}" for b, w in LENGTH_AWARE_CASES])
def test_ragged_length_aware_splits(blocks_per_split, window):
  """Fixed-size splits: lengths 0, 1, the capacity and mixed; every split count of a row."""
  q, k, v, kwargs, _ = ragged_inputs("all_float", 2, seed=19)
  kwargs["window"] = window
  lengths = jnp.asarray([0, 1, S, 8, 9, 17, 35], jnp.int32)
  q = jnp.concatenate([q, q[:2]])
  k, v = jnp.concatenate([k, k[:2]]), jnp.concatenate([v, v[:2]])
  ref = ragged_decode_reference(q, k, v, lengths, **kwargs)
  out = ragged_decode_pallas(q, k, v, lengths, **kwargs, block_kv=4, interpret=True,
                             blocks_per_split=blocks_per_split)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  # Row 0 is empty: no key, so zeros, with or without a sink (it adds weight, never a value).
  assert kwargs["sinks"] is not None  # the case this test covers: the sink does not leak
  assert np.all(np.asarray(out)[0] == 0.0) and np.all(np.asarray(ref)[0] == 0.0)


@pytest.mark.parametrize("transposed", [False, True], ids=["GH", "HG"])
def test_combine_splits_ignores_unwritten_partials(transposed):
  """Splits the kernel skipped hold garbage (here NaN / inf) and must not reach the output, in
  both layouts the kernels write ([.., G, H] and, transposed, [.., H, G])."""
  rng = np.random.default_rng(23)
  batch, kv_heads, splits, group, head_dim = 3, 2, 4, 2, 8
  m = rng.normal(size=(batch, kv_heads, splits, group, 1)).astype(np.float32)
  l = rng.uniform(0.5, 2.0, size=m.shape).astype(np.float32)
  acc = rng.normal(size=(batch, kv_heads, splits, group, head_dim)).astype(np.float32)
  nonempty = np.array([[True, True, False, False], [False] * 4, [True, False, True, True]])
  lay = (lambda x: np.swapaxes(x, -1, -2)) if transposed else (lambda x: x)

  def combine(m, l, acc, written, sink=None):
    out = decode_splits.combine_splits(
        *(jnp.asarray(lay(x)) for x in (m, l, acc)), jnp.asarray(written),
        None if sink is None else jnp.asarray(lay(sink)), jnp.float32)
    return lay(np.asarray(out))  # [B, K, G, H]

  keep = nonempty[:, None, :, None, None]
  want = combine(np.where(keep, m, -1e30), np.where(keep, l, 0.0), np.where(keep, acc, 0.0),
                 np.ones_like(nonempty))
  got = combine(np.where(keep, m, np.nan), np.where(keep, l, np.inf), np.where(keep, acc, np.nan),
                nonempty)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_array_equal(got[1], 0.0)  # nothing written: zeros
  sink = rng.normal(size=(kv_heads, group, 1)).astype(np.float32)
  with_sink = combine(np.where(keep, m, np.nan), np.where(keep, l, np.inf), acc, nonempty, sink)
  np.testing.assert_array_equal(with_sink[1], 0.0)  # only the sink: no value
  assert np.all(np.isfinite(with_sink))


@pytest.mark.parametrize("transposed", [False, True], ids=["GH", "HG"])
@pytest.mark.parametrize("with_sink", [False, True], ids=["", "sink"])
def test_combine_splits_matches_float64_softmax(transposed, with_sink):
  """Partials of a softmax over 4 splits (one unwritten, holding NaN) merge to the whole
  softmax, computed in float64, in both layouts the kernels write: [.., G, H] and [.., H, G]."""
  rng = np.random.default_rng(31)
  batch, kv_heads, splits, group, head_dim, per_split = 2, 3, 4, 4, 8, 5
  logits = 3.0 * rng.standard_normal((batch, kv_heads, splits, group, per_split))
  values = rng.standard_normal((batch, kv_heads, splits, per_split, head_dim))
  nonempty = np.array([[True, True, False, True], [True, True, True, True]])
  m = logits.max(-1, keepdims=True)  # [B, K, P, G, 1]
  e = np.exp(logits - m)
  l = e.sum(-1, keepdims=True)
  acc = e @ values  # [B, K, P, G, H]
  acc = np.where(nonempty[:, None, :, None, None], acc, np.nan)
  m = np.where(nonempty[:, None, :, None, None], m, np.nan)
  sink = rng.standard_normal((kv_heads, group, 1)) if with_sink else None
  seen = np.moveaxis(logits, 2, 3).reshape(batch, kv_heads, group, splits * per_split)
  seen_v = values.reshape(batch, kv_heads, splits * per_split, head_dim)
  keep = np.repeat(nonempty, per_split, axis=1)[:, None, None, :]  # [B, 1, 1, P * S]
  seen = np.where(keep, seen, -np.inf)
  if with_sink:
    seen = np.concatenate([seen, np.broadcast_to(sink, (batch,) + sink.shape)], -1)
    seen_v = np.concatenate([seen_v, np.zeros((batch, kv_heads, 1, head_dim))], 2)
  weights = np.exp(seen - seen.max(-1, keepdims=True))
  want = (weights / weights.sum(-1, keepdims=True)) @ seen_v  # [B, K, G, H]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if transposed:
    t = lambda x: np.swapaxes(x, -1, -2)
    got = decode_splits.combine_splits(
        f32(t(m)), f32(t(l)), f32(t(acc)), jnp.asarray(nonempty),
        None if sink is None else f32(t(sink)), jnp.float32)
    got = np.swapaxes(np.asarray(got), -1, -2)
  else:
    got = np.asarray(decode_splits.combine_splits(
        f32(m), f32(l), f32(acc), jnp.asarray(nonempty), None if sink is None else f32(sink),
        jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


PAGED_STEP_CASES = [(2, 1), (2, 2), (4, None), (4, 1)]


@pytest.mark.parametrize("pages_per_block, blocks_per_split", PAGED_STEP_CASES,
                         ids=[f"ppb{b}-bps{p}" for b, p in PAGED_STEP_CASES])
def test_paged_several_pages_per_step_splits(pages_per_block, blocks_per_split):
  """Steps of 2 or 4 pages over 5-page tables (not a multiple), length-aware splits, garbage
  in unowned pages and past each length."""
  arrays, kwargs, np_inputs = paged_inputs("all", 2, seed=29, garbage=True)
  out = paged_decode_pallas(*arrays, **kwargs, pages_per_block=pages_per_block, interpret=True,
                            blocks_per_split=blocks_per_split)
  assert np.all(np.isfinite(np.asarray(out)))
  expected = numpy_for("all", np_inputs, PAGED_LENGTHS, MAX_PAGES * TPP)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)


@BACKENDS
def test_paged_missing_page_inside_length_is_masked(backend):
  """A -1 table slot inside a row's length is a missing page: its entries are invisible in the
  kernels, as in the reference (not read as page 0, which holds another row's keys)."""
  arrays, kwargs, np_inputs = paged_inputs("plain", 2, seed=5)
  q, key_pages, value_pages, table, lengths = arrays
  table = table.at[1, 2].set(-1)  # row 1 (length 40): its third page is missing
  out = paged_decode_pallas(q, key_pages, value_pages, table, lengths, **kwargs,
                            pages_per_block=2, interpret=True, backend=backend)
  ref = paged_decode_reference(q, key_pages, value_pages, table, lengths, **kwargs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
  q64, k64, v64, sinks = np_inputs
  visible = ragged_visible_np(PAGED_LENGTHS, MAX_PAGES * TPP, None)
  visible[1, 2 * TPP:3 * TPP] = False
  expected = attention_np(q64, k64, v64, visible, scale=SCALE)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)


@BACKENDS
def test_paged_lengths_past_the_table_are_clamped(backend):
  """A length beyond the table's capacity (max_pages * tpp) means the whole table, as in the
  reference: no kernel reads the next row's table entries or past the end of the table."""
  arrays, kwargs, _ = paged_inputs("plain", 2, seed=7)
  q, key_pages, value_pages, table, lengths = arrays
  # Row 1 owns a full table; reading past it would take row 2's pages (visible, unmasked).
  assert int(lengths[1]) == MAX_PAGES * TPP and bool(jnp.all(table[1] >= 0))
  long = lengths.at[1].set(MAX_PAGES * TPP + 13).at[-1].set(MAX_PAGES * TPP + 100)
  out = paged_decode_pallas(q, key_pages, value_pages, table, long, **kwargs,
                            pages_per_block=2, interpret=True, backend=backend)
  ref = paged_decode_reference(q, key_pages, value_pages, table, long, **kwargs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
