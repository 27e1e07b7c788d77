"""Prefill sections of scripts/bench.py: causal attention, feature variants, long context.

  prefill   causal, forward and forward+backward, against cuDNN and tokamax's
            Mosaic kernel (the faster of the two is the baseline of each row);
  features  soft cap (baseline: tokamax Mosaic with logits_soft_cap, which
            cuDNN refuses) and packed segment ids (4 documents per row) with
            sinks (baseline: cuDNN plain causal on the same shape; rates use
            the plain causal flop count, so the ratio is a ratio of times);
  long      forward+backward at long context (default b1 s65536), with peak
            device memory: it must fit in 80 GB.

Flops: 4*b*n*s^2*h forward, halved for causal; forward+backward = 3.5x
forward (the FlashAttention convention).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.layers.kernels import registry
from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.masks import MaskSpec
from meshattn.scripts.bench_common import TOLERANCE, Row, failed, rel_err, time_fn

# Rows named here are the baselines of their (section, shape): ratios divide by the fastest.
BASELINES = ("jax.nn cudnn", "tokamax mosaic")

SOFT_CAP = 50.0
DOCUMENTS = 4
# Our kernels timed in the features section (the reference checks each row either way; a
# caller may drop the slow ones, e.g. ("flash",)).
FEATURE_KERNELS = ("flash", "blockwise", "dot_product")


def _tokamax():
  """tokamax (patched for this JAX) when its Mosaic kernel runs here, else None."""
  try:
    from meshattn.layers.kernels.train import flash_tokamax
  except ImportError:
    return None
  return flash_tokamax._tokamax() if flash_tokamax.tokamax_available() else None


def _request(platform: str, features: set[str], args) -> registry.Request:
  """The request the layer makes: its features, head_dim and dtype (the kernels' limits)."""
  if args.dtype == "float32":
    features = features | {"float32"}
  return registry.Request(platform, "train", frozenset(features), head_dim=args.head_dim,
                          dtype=args.dtype)


def _serves(name: str, platform: str, features: set[str], args) -> bool:
  try:
    registry.select(name, _request(platform, features, args))
  except ValueError:
    return False
  return True


def _ours(name: str, platform: str, features: set[str], args, *, soft_cap: float | None = None,
          segments: bool = False, sinks: jax.Array | None = None):
  """(forward fn, fn for jax.grad) through the registry's `name` kernel, or None where it
  does not serve: the registry picks per request (forward-only vs with backward)."""
  if not (_serves(name, platform, features, args)
          and _serves(name, platform, features | {"backward"}, args)):
    return None

  def fn_for(backward: bool):
    wanted = features | ({"backward"} if backward else set())
    chosen = registry.select(name, _request(platform, wanted, args))
    if name in ("flash", "autoselected"):
      print(f"{name} {sorted(wanted)} h{args.head_dim} {args.dtype}: {chosen.description}")
    kernel = chosen.load()

    def run(q, k, v):
      b, t = q.shape[:2]
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
      seg = None
      if segments:  # DOCUMENTS equal documents per row, ids 1..DOCUMENTS
        seg = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) * DOCUMENTS // t + 1, (b, t))
      options = KernelOptions(mask=MaskSpec("global"), scale=q.shape[-1] ** -0.5,
                              soft_cap=soft_cap)
      return kernel(q, k, v, options=options, q_positions=pos, kv_positions=pos,
                    q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks)[0]
    return run

  return fn_for(False), fn_for(True)


def prefill_kernels(platform: str, args) -> dict[str, tuple[Callable, Callable]]:
  """Name -> (forward fn, fn for jax.grad), each fn(q [B, T, N, H], k, v [B, S, K, H]) -> out."""
  def jax_nn(implementation):
    def run(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return run, run

  kernels = {}
  if platform == "gpu":
    kernels["jax.nn cudnn"] = jax_nn("cudnn")
  tokamax = _tokamax()
  if tokamax is not None:
    run = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="mosaic")
    kernels["tokamax mosaic"] = (run, run)
  kernels["jax.nn xla"] = jax_nn("xla")
  for name in ("dot_product", "blockwise", "flash"):
    pair = _ours(name, platform, {"causal", "gqa"}, args)
    if pair is not None:
      kernels[name] = pair
  return kernels


def _inputs(b: int, seq: int, args):
  dtype = jnp.dtype(args.dtype)
  n, k, h = args.heads, args.kv_heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, seq, n, h), dtype)  # [B, T, N, H]
  kk = jax.random.normal(keys[1], (b, seq, k, h), dtype)  # [B, S, K, H]
  v = jax.random.normal(keys[2], (b, seq, k, h), dtype)  # [B, S, K, H]
  cot = jax.random.normal(keys[3], (b, seq, n, h), dtype)  # [B, T, N, H]
  flops = 4 * b * n * seq * seq * h / 2  # causal forward
  return (q, kk, v), cot, flops, f"b{b} s{seq} n{n} k{k} h{h}"


def _time_kernels(section: str, shape: str, kernels, inputs, cot, flops: float, reference,
                  args, labels=("fwd", "fwd+bwd"), unchecked=()) -> list[Row]:
  """Check then time each (fwd, grad-able) pair; ratios against the fastest baseline row."""
  rows = []
  for name, (fwd_fn, grad_fn) in kernels.items():
    fwd = jax.jit(fwd_fn)
    grad = jax.jit(jax.grad(
        lambda q, k, v: jnp.sum((grad_fn(q, k, v) * cot).astype(jnp.float32)), argnums=(0, 1, 2)))
    err, status = None, "ok"
    try:
      if reference is not None and name not in unchecked:
        err = rel_err(fwd(*inputs), reference)
        if err > TOLERANCE[args.dtype]:
          status = "MISMATCH"
      for label, fn, fl in (("fwd", fwd, flops), ("fwd+bwd", grad, 3.5 * flops)):
        if label not in labels:
          continue
        if status != "ok":
          rows.append(Row(f"{section} {label}", name, shape, None, None, "TFLOP/s", status=status,
                          max_err=err))
          continue
        ms = time_fn(fn, *inputs, iters=args.iters)
        rows.append(Row(f"{section} {label}", name, shape, ms, fl / (ms * 1e-3) / 1e12, "TFLOP/s",
                        max_err=err))
    except Exception as error:  # e.g. OOM for the XLA path at long sequences
      rows.append(Row(section, name, shape, None, None, "TFLOP/s", status=failed(error)))
  for row in rows:
    base = [r.rate for r in rows if r.section == row.section and r.kernel in BASELINES and r.rate]
    if row.rate and base:
      row.ratio = row.rate / max(base)
  return rows


def bench_prefill(args, platform: str) -> list[Row]:
  rows = []
  for b, seq in args.prefill:
    inputs, cot, flops, shape = _inputs(b, seq, args)
    kernels = prefill_kernels(platform, args)
    reference = None
    if args.check:
      # The O(s^2) reference does not fit at long sequences; there blockwise
      # (itself checked against it at the shorter sizes and in the tests) is the reference.
      ref_name = "dot_product" if seq <= args.max_reference_seq else "blockwise"
      reference = jax.jit(kernels[ref_name][0])(*inputs)
    rows += _time_kernels("prefill", shape, kernels, inputs, cot, flops, reference, args)
  return rows


def bench_features(args, platform: str) -> list[Row]:
  """Soft cap vs tokamax; segment ids + sinks vs cuDNN plain causal (same shape, same run)."""
  rows = []
  b, seq = args.features_shape
  inputs, cot, flops, shape = _inputs(b, seq, args)
  tokamax = _tokamax()
  n = args.heads

  # Soft cap.
  kernels = {}
  if tokamax is not None:
    run = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=True, logits_soft_cap=SOFT_CAP, implementation="mosaic")
    kernels["tokamax mosaic"] = (run, run)
  capped = ({"causal", "gqa", "soft_cap"}, dict(soft_cap=SOFT_CAP))
  for name in FEATURE_KERNELS:
    pair = _ours(name, platform, capped[0], args, **capped[1])
    if pair is not None:
      kernels[name] = pair
  if platform == "gpu":
    kernels["pallas gpu flash (direct)"] = _pallas_direct(soft_cap=SOFT_CAP)
  reference = _reference(platform, *capped, inputs, args)
  rows += _time_kernels("soft cap", shape, kernels, inputs, cot, flops, reference, args)

  # Segment ids (packed documents) + sinks; the baseline is plain causal cuDNN.
  sinks = jax.random.normal(jax.random.key(9), (n,), jnp.float32)
  kernels = {}
  if platform == "gpu":
    run = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
    kernels["jax.nn cudnn"] = (run, run)
  packed = ({"causal", "gqa", "segment_ids", "sinks"}, dict(segments=True, sinks=sinks))
  for name in FEATURE_KERNELS:
    pair = _ours(name, platform, packed[0], args, **packed[1])
    if pair is not None:
      kernels[name] = pair
  reference = _reference(platform, *packed, inputs, args)
  rows += _time_kernels(f"segments x{DOCUMENTS} + sinks", shape, kernels, inputs, cot, flops,
                        reference, args, unchecked=("jax.nn cudnn",))
  return rows


def _reference(platform: str, features: set[str], kwargs: dict, inputs, args):
  """The reference kernel's forward output on `inputs` (None without --check)."""
  if not args.check:
    return None
  return jax.jit(_ours("dot_product", platform, features, args, **kwargs)[0])(*inputs)


def _pallas_direct(**options):
  """The project's Pallas GPU (Triton) flash kernel, called without the registry."""
  from meshattn.layers.kernels.train.flash_pallas_gpu import pallas_gpu_flash_attention

  def run(q, k, v):
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    opts = KernelOptions(mask=MaskSpec("global"), scale=q.shape[-1] ** -0.5, **options)
    return pallas_gpu_flash_attention(q, k, v, options=opts, q_positions=pos, kv_positions=pos)[0]
  return run, run


def bench_long(args, platform: str) -> list[Row]:
  """The autoselected kernel's forward+backward at long context, with its peak device memory."""
  rows = []
  features = {"causal", "gqa"}
  chosen = registry.select("autoselected", _request(platform, features | {"backward"}, args))
  for b, seq in args.long:
    inputs, cot, flops, shape = _inputs(b, seq, args)
    reference = None
    if args.check:  # blockwise: O(s) memory, checked against the reference in the tests
      reference = jax.jit(_ours("blockwise", platform, features, args)[0])(*inputs)
    kernels = {f"{chosen.name} ({chosen.description})": _ours("autoselected", platform, features,
                                                              args)}
    got = _time_kernels("long", shape, kernels, inputs, cot, flops, reference, args,
                        labels=("fwd+bwd",))
    # The compiled program's own footprint (a process-wide peak would include
    # whatever ran before, e.g. the O(s^2) reference at 16k).
    memory = _program_bytes(kernels, inputs, cot)
    if memory is not None:
      for row in got:
        row.status += f", program {memory / 2**30:.1f} GiB (args + outputs + temps)"
    rows += got
  return rows


def _program_bytes(kernels, inputs, cot) -> int | None:
  """Device bytes of the forward+backward program of the only kernel in `kernels`."""
  (_, grad_fn), = kernels.values()
  grad = jax.jit(jax.grad(
      lambda q, k, v: jnp.sum((grad_fn(q, k, v) * cot).astype(jnp.float32)), argnums=(0, 1, 2)))
  try:
    stats = grad.lower(*inputs).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes)
