"""The Pallas GPU flash kernel against the reference dot_product kernel.

On CPU the kernels run in the Pallas interpreter (interpret=True), which is
slow, so the cases are few and tiny and each one traces forward and gradients
under a single jax.jit. Every case compares the output and the gradients of
sum(out * cotangent) w.r.t. q, k, v and, where present, the sinks, at 1e-5
relative to the reference's max |value| in float32. The block bounds
(flash_bounds: which tiles are visited, which skip the mask) are also checked
directly against the dense mask, tile by tile, which is fast and covers many
more shapes and segment layouts than the interpreter can. The GPU-only test
runs the compiled Triton kernels (skipped without a GPU).

`python tests/layers/test_flash_pallas_gpu.py` on a GPU machine prints a
timing table against cuDNN and the blockwise kernel; scripts/tune_flash_pallas_gpu.py
sweeps the tile and Triton settings.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.layers import KernelOptions, MaskSpec, dot_product_attention
from meshattn.layers.kernels.train import flash_bounds as fb
from meshattn.layers.kernels.train import flash_pallas_gpu_tiles as tiles_lib
from meshattn.layers.kernels.train.flash_pallas_gpu import (
    PALLAS_GPU_FLASH_FEATURES, pallas_gpu_flash_attention)
from meshattn.layers.masks import segment_mask, structural_mask


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 1
  heads: int = 4
  kv_heads: int = 2
  length: int = 64
  kv_length: int | None = None  # None: same as length
  head_dim: int = 32
  mask: MaskSpec = dataclasses.field(default_factory=MaskSpec)
  segments: str | None = None  # a key of SEGMENT_LAYOUTS
  soft_cap: float | None = None
  sinks: bool = False
  blocks: tuple[int, int] | None = (32, 32)  # block_q, block_kv (None: the kernel's defaults)
  bwd_blocks: tuple[int, int] | None = None  # dq: block_q_bwd, block_kv_bwd (None: the forward tiles)
  dkv_blocks: tuple[int, int] | None = None  # block_q_dkv, block_kv_dkv (None: dq's)
  kv_holes: bool = False  # some key positions -1 (empty slots; full mask only)


def _runs(length: int, runs) -> np.ndarray:
  """Segment ids from (id, count) runs, cut or right-padded with 0 to length."""
  row = np.concatenate([np.full(n, i) for i, n in runs])[:length]
  return np.pad(row, (0, length - row.size))


# Each layout: (query rows, key rows) as functions of the lengths (batch of 2 rows).
SEGMENT_LAYOUTS = {
    # Two packed segments, then right padding (segment 0); row 1 packs differently.
    "packed": lambda t, s: ([_runs(t, [(1, t // 3), (2, t - 8 - t // 3)]),
                             _runs(t, [(3, t // 2), (5, t - 4 - t // 2)])],) * 2,
    # Row 0: id 1 reappears after id 2, short segments (one query block spans
    # several), padding in the middle. Row 1: long segments (interior tiles).
    "mixed": lambda t, s: ([_runs(t, [(1, 20), (2, 30), (1, 25), (0, 6), (3, 9), (7, 14), (1, t)]),
                            _runs(t, [(4, 70), (5, max(t - 78, 0))])],) * 2,
    # Cross lengths: query ids absent from the keys (9) and keys of an id no
    # query has (6): their ranges are empty.
    "cross": lambda t, s: ([_runs(t, [(1, 24), (9, 16), (2, t)]), _runs(t, [(3, t - 5)])],
                           [_runs(s, [(2, 30), (1, 40), (6, 10), (2, s)]),
                            _runs(s, [(6, 20), (3, s)])]),
}

CASES = {
    "mha_causal": Case(heads=2, kv_heads=2),
    # Padding (segment 0) rows, a window crossing block edges, cap and sinks together.
    "gqa_window_segments_cap_sinks": Case(
        batch=2, length=128, mask=MaskSpec("local_sliding", window=40), segments="packed",
        soft_cap=5.0, sinks=True),
    "mqa_chunk_sinks": Case(kv_heads=1, head_dim=64, mask=MaskSpec("chunk", chunk=48), sinks=True),
    # 80 is not a multiple of the block: padded keys and dropped query rows.
    "gqa_full_segments_padded_len": Case(batch=2, length=80, mask=MaskSpec("full"),
                                         segments="packed"),
    # Segment skipping with arbitrary ids: MHA / GQA / MQA, causal / window / chunk.
    # Here also dq and dkv tiles unlike the forward's and transposed; 100 pads to all.
    "mha_causal_mixed_segments_sinks_bwd_tiles": Case(
        batch=2, heads=2, kv_heads=2, length=100, segments="mixed", sinks=True, blocks=(32, 16),
        bwd_blocks=(64, 16), dkv_blocks=(16, 64)),
    "gqa_window_mixed_segments_cap": Case(batch=2, length=128, segments="mixed", soft_cap=5.0,
                                          mask=MaskSpec("local_sliding", window=24),
                                          blocks=(16, 32)),
    "mqa_chunk_mixed_segments": Case(batch=2, kv_heads=1, length=128, segments="mixed",
                                     mask=MaskSpec("chunk", chunk=40), blocks=(16, 16)),
    # Window without segments: mask-free interior between two edge ranges; more
    # queries than keys (padded keys inside the causal range, rows seeing no key).
    "gqa_window_cap_bwd_tiles": Case(length=128, kv_length=72, soft_cap=5.0,
                                     mask=MaskSpec("local_sliding", window=40), blocks=(16, 16),
                                     bwd_blocks=(32, 16)),
    # Full mask: empty key slots (position -1) and ids missing on the other side.
    "gqa_full_cross_segments_holes": Case(batch=2, length=64, kv_length=112, mask=MaskSpec("full"),
                                          segments="cross", kv_holes=True, sinks=True),
    # Gemma 2's head_dim with its default tiles (issue 14.8: the backward's tiles once needed
    # more shared memory than the H200 has): packed documents, sinks and a soft cap.
    "gqa_causal_segments_cap_sinks_h256": Case(length=128, head_dim=256, segments="packed",
                                               soft_cap=5.0, sinks=True, blocks=None),
}


def _inputs(case: Case, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 6)
  b, t, n, k, h = case.batch, case.length, case.heads, case.kv_heads, case.head_dim
  s = case.kv_length or t
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)  # [B, T, N, H]
  key = jax.random.normal(ks[1], (b, s, k, h), dtype)  # [B, S, K, H]
  value = jax.random.normal(ks[2], (b, s, k, h), dtype)  # [B, S, K, H]
  sinks = jax.random.normal(ks[3], (n,), jnp.float32) if case.sinks else None  # [N]
  cotangent = jax.random.normal(ks[4], (b, t, n, h), dtype)  # [B, T, N, H]
  q_seg = kv_seg = None
  if case.segments:
    q_rows, kv_rows = SEGMENT_LAYOUTS[case.segments](t, s)
    q_seg = jnp.asarray(np.stack(q_rows[:b]), jnp.int32)  # [B, T]
    # One array for both when the layout is self-attention (the wrapper then sorts once).
    kv_seg = q_seg if kv_rows is q_rows else jnp.asarray(np.stack(kv_rows[:b]), jnp.int32)
  q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
  kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [B, S]
  if case.kv_holes:
    kv_pos = jnp.where(jax.random.bernoulli(ks[5], 0.1, (b, s)), -1, kv_pos)
  return q, key, value, sinks, cotangent, (q_pos, kv_pos, q_seg, kv_seg)


def _run_both(case: Case, interpret: bool, dtype=jnp.float32):
  q, k, v, sinks, ct, (q_pos, kv_pos, q_seg, kv_seg) = _inputs(case, dtype)
  options = KernelOptions(mask=case.mask, scale=case.head_dim ** -0.5, soft_cap=case.soft_cap)

  def loss(fn, q, k, v, sinks):
    out, _ = fn(q, k, v, options=options, q_positions=q_pos, kv_positions=kv_pos,
                q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=sinks)
    return (out.astype(jnp.float32) * ct.astype(jnp.float32)).sum(), out

  bq, bkv = case.blocks or (None, None)
  bq_bwd, bkv_bwd = case.bwd_blocks or case.blocks or (None, None)
  bq_dkv, bkv_dkv = case.dkv_blocks or (None, None)
  flash = functools.partial(pallas_gpu_flash_attention, block_q=bq, block_kv=bkv,
                            block_q_bwd=bq_bwd, block_kv_bwd=bkv_bwd, block_q_dkv=bq_dkv,
                            block_kv_dkv=bkv_dkv, interpret=interpret)
  argnums = (0, 1, 2, 3) if case.sinks else (0, 1, 2)

  @jax.jit
  def both(q, k, v, sinks):
    results = []
    for fn in (dot_product_attention, flash):
      grads, out = jax.grad(functools.partial(loss, fn), argnums=argnums, has_aux=True)(
          q, k, v, sinks)
      results.append((out, grads))
    return results

  # XLA on GPU runs float32 einsums in TF32 by default; the kernel's float32
  # dots are exact, so the reference must be too.
  with jax.default_matmul_precision("highest"):
    return both(q, k, v, sinks)


def _assert_close(ref, got, tol, what):
  ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
  assert np.isfinite(got).all(), what
  err = np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-30)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _empty_rows(case: Case) -> np.ndarray | None:
  """[B, T] rows that attend nowhere: segment 0, or an id that no key has."""
  if case.segments is None:
    return None
  _, _, _, _, _, (_, _, q_seg, kv_seg) = _inputs(case)
  q_seg, kv_seg = np.asarray(q_seg), np.asarray(kv_seg)
  return np.stack([~np.isin(q, k) | (q == 0) for q, k in zip(q_seg, kv_seg)])


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_interpret(name):
  case = CASES[name]
  (ref_out, ref_grads), (out, grads) = _run_both(case, interpret=True)
  _assert_close(ref_out, out, 1e-5, "output")
  for label, r, g in zip(("dq", "dk", "dv", "dsinks"), ref_grads, grads):
    _assert_close(r, g, 1e-5, label)
  # Rows that attend nowhere (their loops are empty) are exactly zero, dq too, even with sinks.
  empty = _empty_rows(case)
  if empty is not None and empty.any():
    assert np.all(np.asarray(out)[empty] == 0.0) and np.all(np.asarray(grads[0])[empty] == 0.0)


def test_cases_cover_empty_rows():
  """Segment 0 rows, with sinks, and ids missing from the keys are among the cases."""
  with_sinks = [n for n, c in CASES.items() if c.sinks and c.segments]
  assert any(_empty_rows(CASES[n]).any() for n in with_sinks)
  cross = _empty_rows(CASES["gqa_full_cross_segments_holes"])
  q_seg = np.asarray(_inputs(CASES["gqa_full_cross_segments_holes"])[5][2])
  assert (cross & (q_seg != 0)).any()  # an id (9) that no key has


# ---- Block bounds against the dense mask (no kernel run) ------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _tile_bounds(spec: MaskSpec, t: int, s: int, bq: int, bkv: int, same: bool, kv_pos, q_seg,
                 kv_seg):
  """Dense per-tile mask facts and the kernels' loop ranges, on the padded grid the wrapper
  builds (padded queries continue the index, padded keys get position -1 and segment 0)."""
  batch, t_pad, s_pad = kv_pos.shape[0], -(-t // bq) * bq, -(-s // bkv) * bkv
  nq, nkv = t_pad // bq, s_pad // bkv
  q_pos = jnp.broadcast_to(jnp.arange(t_pad, dtype=jnp.int32), (batch, t_pad))  # [B, T']
  kv_pos = jnp.pad(kv_pos, ((0, 0), (0, s_pad - s)), constant_values=-1)  # [B, S']
  allowed = structural_mask(spec, q_pos, kv_pos)  # [B, T', S']
  ranges = None
  if q_seg is not None:
    q_seg = jnp.pad(q_seg, ((0, 0), (0, t_pad - t)))  # [B, T']
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, s_pad - s)))  # [B, S']
    allowed = allowed & segment_mask(q_seg, kv_seg)
    ranges = fb.segment_ranges(q_seg, kv_seg, same=same)
  tiles = allowed.reshape(batch, nq, bq, nkv, bkv)
  facts = tiles.any((2, 4)), tiles.all((2, 4))  # [B, nq, nkv] each
  out = {}
  for side, n, data_fn, rng, interior in (
      ("kv", nq, fb.kv_data_bounds, fb.kv_block_range(spec, bq, bkv, jnp.arange(nq), nkv),
       fb.kv_block_interior(spec, bq, bkv, jnp.arange(nq), s // bkv)),
      ("q", nkv, fb.q_data_bounds, fb.q_block_range(spec, bq, bkv, jnp.arange(nkv), nq),
       fb.q_block_interior(spec, bq, bkv, jnp.arange(nkv), nq, s // bkv))):
    data = data_fn(spec, bq, bkv, nq, kv_pos, q_seg, kv_seg, ranges)  # [B, n * 4] or None
    if data is not None:
      data = tuple(jnp.moveaxis(data.reshape(batch, n, 4), -1, 0))  # 4 x [B, n]
    out[side] = jnp.stack([jnp.broadcast_to(x, (batch, n)) for x in fb.loop_ranges(
        rng, interior, data)])  # [4, B, n]: lo, a, c, hi
  return facts, out


def _check_bounds(spec: MaskSpec, t: int, s: int, bq: int, bkv: int, q_seg=None, kv_seg=None,
                  kv_positions=None):
  """Every tile with an allowed pair is visited; every interior tile is fully allowed.

  Both directions (forward / dq by query block, dkv by key block). Returns
  (tiles visited, mask-free tiles, tiles holding an allowed pair), both directions summed.
  """
  if kv_positions is None:
    kv_positions = np.broadcast_to(np.arange(s), (2, s))
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  same = q_seg is not None and t == s and np.array_equal(q_seg, kv_seg)
  (any_pair, all_pairs), ranges = jax.tree.map(np.asarray, _tile_bounds(
      spec, t, s, bq, bkv, same, as_int(kv_positions), as_int(q_seg), as_int(kv_seg)))
  visited = interior = 0
  for side, (lo, a, c, hi) in ranges.items():
    any_b, all_b = (any_pair, all_pairs) if side == "kv" else (any_pair.swapaxes(1, 2),
                                                               all_pairs.swapaxes(1, 2))
    other = np.arange(any_b.shape[-1])  # [n_other]
    lo, a, c, hi = (x[..., None] for x in (lo, a, c, hi))  # [B, n, 1]
    assert not (any_b & ((other < lo) | (other >= hi))).any(), f"{side}: allowed tile skipped"
    assert not (~all_b & (other >= a) & (other < c)).any(), f"{side}: masked tile in interior"
    visited += int((hi - lo).sum())
    interior += int((c - a).sum())
  return visited, interior, int(any_pair.sum()) * 2


BOUND_SPECS = [MaskSpec(), MaskSpec("full"), MaskSpec("local_sliding", window=40),
               MaskSpec("local_sliding", window=7), MaskSpec("chunk", chunk=48),
               MaskSpec("chunk", chunk=16)]


@pytest.mark.parametrize("spec", BOUND_SPECS,
                         ids=lambda s: f"{s.attention_type}{s.window or s.chunk or ''}")
@pytest.mark.parametrize("layout", [None, "mixed", "random"])
def test_bounds_cover_mask(spec, layout):
  rng = np.random.default_rng(0)
  shapes = [((128, 128), (32, 16)), ((80, 112), (16, 64)), ((112, 72), (16, 32))]
  # Two of the three shapes per layout (each eager check takes ~1.5 s on CPU); over the three
  # layouts every shape meets every mask twice.
  skip = [None, "mixed", "random"].index(layout)
  for (t, s), (bq, bkv) in shapes[:skip] + shapes[skip + 1:]:
    q_seg = kv_seg = kv_positions = None
    if layout == "random":  # ids in any order, pairs anywhere
      q_seg, kv_seg = rng.integers(0, 4, (2, t)), rng.integers(0, 4, (2, s))
    elif layout is not None:  # the layout's query rows, at each length
      q_seg = np.stack(SEGMENT_LAYOUTS[layout](t, t)[0])
      kv_seg = np.stack(SEGMENT_LAYOUTS[layout](s, s)[0])
    if spec.attention_type == "full":
      kv_positions = jnp.asarray(np.where(rng.random((2, s)) < 0.05, -1, np.arange(s)))
    _check_bounds(spec, t, s, bq, bkv, q_seg, kv_seg, kv_positions)


def test_bounds_skip_packed_documents():
  """4 equal packed documents: about a quarter of the causal tiles are visited, and only the
  diagonal ones need the mask (as without segments)."""
  t = 1024
  seg = np.repeat(np.arange(1, 5), t // 4)[None].repeat(2, 0)
  visited_plain, interior_plain, _ = _check_bounds(MaskSpec(), t, t, 64, 32)
  visited, interior, needed = _check_bounds(MaskSpec(), t, t, 64, 32, seg, seg)
  assert visited == needed  # block-aligned documents: no wasted tile
  assert visited < 0.3 * visited_plain
  assert visited - interior == visited_plain - interior_plain  # the same diagonal tiles


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_default_tiles_fit_shared_memory(head_dim, itemsize):
  """Every head_dim the registry lets through gets tiles whose three kernels fit 227 KB per
  block (Hopper), and the 163 KB of an A100 after shrinking."""
  for limit in (tiles_lib.HOPPER_SHARED_MEMORY, 166912):
    tiles = tiles_lib.Tiles.get_default(head_dim, itemsize, limit)
    tiles.check_fits(head_dim, itemsize, limit)
    assert min(tiles.block_q, tiles.block_kv, tiles.block_q_bwd, tiles.block_kv_dkv) >= 16
  assert tiles_lib.unsupported(head_dim, "float32" if itemsize == 4 else "bfloat16", True) is None


def test_shared_memory_model_bounds_the_h200_refusal():
  """The H200 refused the old dq tiles (128 x 64, 2 stages) at head_dim 256 in bfloat16 with
  "requested 262656"; the model must say at least that, and that it does not fit."""
  need = tiles_lib.shared_memory_bytes("dq", 128, 64, 256, 2, 2)
  assert 262656 <= need <= 262656 + 1024 and need > tiles_lib.HOPPER_SHARED_MEMORY
  wide = tiles_lib.Tiles.get_default(256, 2)
  assert (wide.block_q_bwd, wide.block_kv_bwd, wide.block_q_dkv, wide.block_kv_dkv) == (64,) * 4


def test_tiles_over_shared_memory_refused_before_compiling():
  """Compiled (not interpreted) calls check the tiles first: on this CPU too."""
  x = jnp.zeros((1, 256, 2, 256), jnp.bfloat16)  # [B, T, N, H]
  pos = jnp.arange(256)[None]  # [1, T]
  call = functools.partial(pallas_gpu_flash_attention, x, x, x, options=KernelOptions(),
                           q_positions=pos, kv_positions=pos)
  with pytest.raises(ValueError, match=r"shared memory per block \(232448 bytes\) at head_dim "
                                       r"256.*dq \(block_q_bwd / block_kv_bwd / num_stages_bwd\) "
                                       r"needs 263168 bytes"):
    call(block_q_bwd=128, block_kv_bwd=64)
  with pytest.raises(ValueError, match=r"fwd \(block_q / block_kv / num_stages\) needs"):
    call(block_q=128, block_kv=128)
  # The defaults pass the same check; dkv takes the dq tiles the caller chose.
  given = dict.fromkeys(dataclasses.asdict(tiles_lib.Tiles.get_default(256, 2)))
  tiles_lib.call_tiles(256, 2, 4096, 4096, False, **given)
  chosen = tiles_lib.call_tiles(256, 2, 4096, 4096, True, **{**given, "block_q_bwd": 32})
  assert (chosen.block_q_bwd, chosen.block_q_dkv, chosen.block_kv_dkv) == (32, 32, 64)


def test_tuning_arguments_validated():
  x = jnp.zeros((1, 16, 2, 16))  # [B, T, N, H]
  pos = jnp.arange(16)[None]  # [1, T]
  call = functools.partial(pallas_gpu_flash_attention, x, x, x, options=KernelOptions(),
                           q_positions=pos, kv_positions=pos, interpret=True)
  for kwargs in ({"block_q_bwd": 24}, {"block_kv_bwd": 8}, {"block_q_dkv": 48},
                 {"block_kv_dkv": 0}, {"num_warps": 3}, {"num_stages": 0}, {"num_stages_bwd": 0},
                 {"num_warps_bwd": 64}):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      call(**kwargs)


@pytest.mark.parametrize("feature,kwargs", [
    ("user_mask", {"mask": jnp.ones((1, 1, 16, 16), bool)}),
    ("user_bias", {"bias": jnp.zeros((1, 1, 16, 16))}),
    ("weights", {"return_weights": True}),
    ("dropout", {"options": KernelOptions(dropout_rate=0.1), "deterministic": False}),
    ("score_mod", {"options": KernelOptions(score_mod=lambda s, *_: s)}),
    ("mask_mod", {"options": KernelOptions(mask_mod=lambda b, h, q, k: q >= k)}),
])
def test_unsupported_features_raise(feature, kwargs):
  x = jnp.zeros((1, 16, 2, 16))  # [B, T, N, H]
  pos = jnp.arange(16)[None]  # [1, T]
  kwargs = {"options": KernelOptions(), **kwargs}
  with pytest.raises(ValueError, match=feature):
    pallas_gpu_flash_attention(x, x, x, q_positions=pos, kv_positions=pos, interpret=True,
                               **kwargs)
  assert feature not in PALLAS_GPU_FLASH_FEATURES


def test_feature_names():
  assert PALLAS_GPU_FLASH_FEATURES == {
      "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "backward",
      "float32"}


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (compiled Triton kernels)")
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_reference_gpu(name, dtype):
  """The compiled kernels, bf16 too (2e-2: bf16 tiles vs the reference's bf16 einsums)."""
  case = CASES[name]
  case = dataclasses.replace(case, length=case.length * 4,
                             kv_length=case.kv_length and case.kv_length * 4)
  tol = 2e-5 if dtype == "float32" else 2e-2
  with jax.default_device(jax.devices("gpu")[0]):
    (ref_out, ref_grads), (out, grads) = _run_both(case, interpret=False, dtype=jnp.dtype(dtype))
  _assert_close(ref_out, out, tol, "output")
  for label, r, g in zip(("dq", "dk", "dv", "dsinks"), ref_grads, grads):
    _assert_close(r, g, tol * (5 if label == "dsinks" else 1), label)


# ---- GPU timing (python tests/layers/test_flash_pallas_gpu.py) ----------------------


def _time(fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def bench(b=4, s=4096, n=32, k=8, h=128):
  from meshattn.layers.kernels.train.blockwise import blockwise_attention
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, s, n, h), jnp.bfloat16)  # [B, T, N, H]
  key = jax.random.normal(ks[1], (b, s, k, h), jnp.bfloat16)  # [B, S, K, H]
  v = jax.random.normal(ks[2], (b, s, k, h), jnp.bfloat16)  # [B, S, K, H]
  ct = jax.random.normal(ks[3], (b, s, n, h), jnp.bfloat16)  # [B, T, N, H]
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  scale = h ** -0.5
  plain = KernelOptions(scale=scale)
  capped = KernelOptions(scale=scale, soft_cap=30.0)

  def ours(options, **kw):
    return lambda q, k, v: pallas_gpu_flash_attention(
        q, k, v, options=options, q_positions=pos, kv_positions=pos, **kw)[0]

  kernels = {
      "cudnn causal": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, scale=scale, implementation="cudnn"),
      "pallas causal": ours(plain),
      "pallas causal bq64": ours(plain, block_q=64, block_kv=64),
      "pallas causal+cap": ours(capped),
      "blockwise causal+cap": lambda q, k, v: blockwise_attention(
          q, k, v, options=capped, q_positions=pos, kv_positions=pos)[0],
  }
  flops = 4 * b * n * s * s * h / 2
  print(f"b{b} s{s} n{n} k{k} h{h} bf16, causal; TFLOP/s = 4bns^2h/2 fwd, x3.5 fwd+bwd")
  print(f"{'kernel':24s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'f+b ms':>8s} {'TFLOP/s':>8s}")
  for name, fn in kernels.items():
    try:
      fwd = jax.jit(fn)
      step = jax.jit(jax.grad(
          lambda q, k, v, fn=fn: (fn(q, k, v).astype(jnp.float32) * ct).sum(),
          argnums=(0, 1, 2)))
      t_f, t_b = _time(fwd, q, key, v), _time(step, q, key, v)
      print(f"{name:24s} {t_f * 1e3:8.2f} {flops / t_f / 1e12:8.1f} {t_b * 1e3:8.2f} "
            f"{3.5 * flops / t_b / 1e12:8.1f}", flush=True)
    except Exception as e:  # noqa: BLE001 -- report and keep timing the rest
      print(f"{name:24s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
  bench()
