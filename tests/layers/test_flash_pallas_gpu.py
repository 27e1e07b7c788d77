"""The Pallas GPU flash kernel against the reference dot_product kernel.

On CPU the kernels run in the Pallas interpreter (interpret=True), which is
slow, so the cases are few and tiny and each one traces forward and gradients
under a single jax.jit. Every case compares the output and the gradients of
sum(out * cotangent) w.r.t. q, k, v and, where present, the sinks, at 1e-5
relative to the reference's max |value| in float32. The GPU-only test runs
the compiled Triton kernels (skipped without a GPU).

`python tests/layers/test_flash_pallas_gpu.py` on a GPU machine prints a
timing table against cuDNN and the blockwise kernel.
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
from meshattn.layers.kernels.flash_pallas_gpu import (
    PALLAS_GPU_FLASH_FEATURES, pallas_gpu_flash_attention)


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 1
  heads: int = 4
  kv_heads: int = 2
  length: int = 64
  head_dim: int = 32
  mask: MaskSpec = MaskSpec()
  segments: bool = False
  soft_cap: float | None = None
  sinks: bool = False


CASES = {
    "mha_causal": Case(heads=2, kv_heads=2),
    # Padding (segment 0) rows, a window crossing block edges, cap and sinks together.
    "gqa_window_segments_cap_sinks": Case(
        batch=2, length=128, mask=MaskSpec("local_sliding", window=40), segments=True,
        soft_cap=5.0, sinks=True),
    "mqa_chunk_sinks": Case(kv_heads=1, head_dim=64, mask=MaskSpec("chunk", chunk=48), sinks=True),
    # 80 is not a multiple of the block: padded keys and dropped query rows.
    "gqa_full_segments_padded_len": Case(batch=2, length=80, mask=MaskSpec("full"), segments=True),
}


def _inputs(case: Case, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 5)
  b, t, n, k, h = case.batch, case.length, case.heads, case.kv_heads, case.head_dim
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)  # [B, T, N, H]
  key = jax.random.normal(ks[1], (b, t, k, h), dtype)  # [B, S, K, H]
  value = jax.random.normal(ks[2], (b, t, k, h), dtype)  # [B, S, K, H]
  sinks = jax.random.normal(ks[3], (n,), jnp.float32) if case.sinks else None  # [N]
  cotangent = jax.random.normal(ks[4], (b, t, n, h), dtype)  # [B, T, N, H]
  seg = None
  if case.segments:
    # Two packed segments, then right padding (segment 0); batch 1 packs differently.
    cut, pad = t // 3, t - 8
    idx = jnp.arange(t)
    row0 = jnp.where(idx < cut, 1, jnp.where(idx < pad, 2, 0))
    row1 = jnp.where(idx < t // 2, 3, jnp.where(idx < t - 4, 5, 0))
    seg = jnp.stack([row0, row1][:b]).astype(jnp.int32)  # [B, T]
  return q, key, value, sinks, cotangent, seg


def _run_both(case: Case, interpret: bool, dtype=jnp.float32):
  q, k, v, sinks, ct, seg = _inputs(case, dtype)
  pos = jnp.broadcast_to(jnp.arange(case.length, dtype=jnp.int32), (case.batch, case.length))
  options = KernelOptions(mask=case.mask, scale=case.head_dim ** -0.5, soft_cap=case.soft_cap)

  def loss(fn, q, k, v, sinks):
    out, _ = fn(q, k, v, options=options, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                kv_segment_ids=seg, sinks=sinks)
    return (out.astype(jnp.float32) * ct.astype(jnp.float32)).sum(), out

  flash = functools.partial(pallas_gpu_flash_attention, block_q=32, block_kv=32,
                            interpret=interpret)
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


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_interpret(name):
  (ref_out, ref_grads), (out, grads) = _run_both(CASES[name], interpret=True)
  _assert_close(ref_out, out, 1e-5, "output")
  for label, r, g in zip(("dq", "dk", "dv", "dsinks"), ref_grads, grads):
    _assert_close(r, g, 1e-5, label)


def test_padding_rows_are_zero():
  """Segment 0 attends nowhere: its rows are exactly zero even with sinks."""
  case = CASES["gqa_window_segments_cap_sinks"]
  (_, _), (out, _) = _run_both(case, interpret=True)
  _, _, _, _, _, seg = _inputs(case)
  assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0.0)


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
  case = dataclasses.replace(CASES[name], length=CASES[name].length * 4)
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
  from meshattn.layers.kernels.blockwise import blockwise_attention
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
          lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * ct).sum(), argnums=(0, 1, 2)))
      t_f, t_b = _time(fwd, q, key, v), _time(step, q, key, v)
      print(f"{name:24s} {t_f * 1e3:8.2f} {flops / t_f / 1e12:8.1f} {t_b * 1e3:8.2f} "
            f"{3.5 * flops / t_b / 1e12:8.1f}", flush=True)
    except Exception as e:  # pylint: disable=broad-except  # report and keep timing the rest
      print(f"{name:24s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
  bench()
