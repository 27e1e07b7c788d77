"""Benchmark meshattn's kernels next to jax.nn.dot_product_attention.

    python scripts/bench.py [--check] [--prefill 4x4096 1x16384] [--decode 64x4096 8x32768] ...
    python scripts/bench.py --cpu-smoke          # tiny sizes, seconds (CI keeps it working)

Prints a table per section and writes bench.json (and bench.png when
matplotlib is installed) under --out:

  prefill  causal attention, forward and forward+backward: ms and TFLOP/s
           (4*b*h*s^2*d forward, halved for causal; forward+backward = 3.5x
           forward, the FlashAttention convention); `features` (soft cap;
           segment ids + sinks) and `long` (long context, peak memory) are
           in scripts/bench_prefill.py;
  decode   one query token per sequence over a KV cache, uniform and ragged
           lengths, contiguous and paged: ms and GB/s of *valid* K/V bytes
           read, and that as a fraction of the device copy bandwidth
           measured in the same run.
  steps    the layer's serving steps against their parts (scripts/bench_layer.py):
           decode through `jit_step` (checked and not), `nnx.jit` and a
           16-step `lax.scan` against kernel + projections + one-token write,
           contiguous / paged / int8; a fresh prefill against the train
           forward; a chunk over cached tokens against projections + cuDNN +
           write. The ratio (lower is better) is in the status column.
  linear   (not in the default sections; scripts/bench_linear.py) linear
           attention fwd+bwd against flash causal at b1 s65536, and its
           decode step (state) against softmax decode at kv 4096 / 65536.

Baselines timed in the same run: jax.nn.dot_product_attention with
implementation="xla" and "cudnn" (GPU), and tokamax's Mosaic GPU kernel where
tokamax is installed (Hopper+). With --check every kernel is first
compared with the reference on the same inputs; one that disagrees is
reported as MISMATCH and not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.layers.kernels import registry
from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.masks import MaskSpec
from meshattn.scripts.bench_common import (
    TOLERANCE, Row, copy_bandwidth, failed, rel_err, time_fn, to_pages)
from meshattn.scripts import bench_layer as bench_layer_steps
from meshattn.scripts.bench_linear import bench_linear
from meshattn.scripts.bench_prefill import bench_features, bench_long, bench_prefill

__all__ = ["Row", "TOLERANCE", "rel_err", "time_fn", "main"]


# ---- decode ------------------------------------------------------------------


def decode_kernels(platform: str) -> dict[str, tuple[Callable, bool]]:
  """Name -> (fn(q [B, N, H], k, v [B, S, K, H], lengths [B], pages) -> [B, N, H], paged?)."""
  from meshattn.layers.kernels.decode import decode
  kernels = {}

  def jax_nn(implementation):
    def run(q, k, v, lengths, paged):
      out = jax.nn.dot_product_attention(
          q[:, None], k, v, key_value_seq_lengths=lengths, implementation=implementation)
      return out[:, 0]
    return run

  kernels["jax.nn xla"] = (jax_nn("xla"), False)
  if platform == "gpu":
    kernels["jax.nn cudnn"] = (jax_nn("cudnn"), False)

  def ragged(impl):
    def run(q, k, v, lengths, paged):
      return decode.ragged_decode(q, k, v, lengths, scale=q.shape[-1] ** -0.5, implementation=impl)
    return run

  def paged_fn(impl):
    def run(q, k, v, lengths, paged):
      key_pages, value_pages, table, page_owner, slots = paged
      return decode.paged_decode(q, key_pages, value_pages, table, lengths, page_owner=page_owner,
                                 slots=slots, scale=q.shape[-1] ** -0.5, implementation=impl)
    return run

  kernels["ragged (reference)"] = (ragged("reference"), False)
  kernels["paged (reference)"] = (paged_fn("reference"), True)
  if platform in ("gpu", "tpu"):
    kernels["ragged (pallas)"] = (ragged("pallas"), False)
    kernels["paged (pallas)"] = (paged_fn("pallas"), True)
  return kernels


def bench_decode(args, platform: str) -> list[Row]:
  rows = []
  dtype = jnp.dtype(args.dtype)
  n, k, h = args.heads, args.kv_heads, args.head_dim
  biggest = max(b * s for b, s in args.decode) * k * h * 2 * dtype.itemsize
  bandwidth = copy_bandwidth(biggest, iters=args.decode_iters)
  rows.append(Row("decode", "device copy", f"{biggest / 2**20:.0f} MiB", None, bandwidth, "GB/s", ratio=1.0))
  for b, s in args.decode:
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (b, n, h), dtype)
    kk = jax.random.normal(keys[1], (b, s, k, h), dtype)
    v = jax.random.normal(keys[2], (b, s, k, h), dtype)
    for ragged in (False, True):
      lengths = (jax.random.randint(keys[3], (b,), 1, s + 1) if ragged
                 else jnp.full((b,), s, jnp.int32)).astype(jnp.int32)
      valid_bytes = float(jnp.sum(lengths)) * k * h * 2 * dtype.itemsize
      key_pages, value_pages, table = to_pages(kk, v, args.tokens_per_page)
      slots = jnp.arange(b, dtype=jnp.int32)  # row i is slot i, owning the pages of its table
      owner = jnp.full(key_pages.shape[:1], -1, jnp.int32).at[table].set(slots[:, None])  # [P]
      pages = (key_pages, value_pages, table, owner, slots)
      shape = f"b{b} kv{s} {'ragged' if ragged else 'uniform'}"
      reference = None
      from meshattn.layers.kernels.decode import decode
      if args.check:
        reference = jax.jit(lambda q, k, v, l: decode.ragged_decode(
            q, k, v, l, scale=h ** -0.5, implementation="reference"))(q, kk, v, lengths)
      if not ragged and platform in ("gpu", "tpu"):
        rows += bench_int8_decode(q, kk, v, lengths, shape, valid_bytes, bandwidth, args)
      for name, (fn, paged) in decode_kernels(platform).items():
        call = jax.jit(fn)
        err, status = None, "ok"
        try:
          out = call(q, kk, v, lengths, pages)
          if reference is not None:
            err = rel_err(out, reference)
            if err > TOLERANCE[args.dtype]:
              status = "MISMATCH"
          if status != "ok":
            rows.append(Row("decode", name, shape, None, None, "GB/s", status=status, max_err=err))
            continue
          ms = time_fn(call, q, kk, v, lengths, pages, iters=args.decode_iters)
          rate = valid_bytes / (ms * 1e-3) / 1e9
          rows.append(Row("decode", name, shape, ms, rate, "GB/s", ratio=rate / bandwidth, max_err=err))
        except Exception as error:
          rows.append(Row("decode", name, shape, None, None, "GB/s", status=failed(error)))
  return rows


def bench_int8_decode(q, k, v, lengths, shape, valid_bytes, bandwidth, args) -> list[Row]:
  """`ragged_decode` over an int8 cache (the Mosaic kernel where routed, else Triton) vs bf16."""
  from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head
  from meshattn.layers.kernels.decode import decode
  kq, ks = quantize(k, KVQuant("int8"))
  vq, vs = quantize(v, KVQuant("int8"))
  ks, vs = scales_by_head(ks), scales_by_head(vs)  # [B, K, S], as the cache stores them
  scale = q.shape[-1] ** -0.5
  plain = jax.jit(lambda q, k, v, l: decode.ragged_decode(q, k, v, l, scale=scale))
  quant = jax.jit(lambda q, k, v, l, ks, vs: decode.ragged_decode(q, k, v, l, scale=scale,
                                                                  key_scale=ks, value_scale=vs))
  ms_plain = time_fn(plain, q, k, v, lengths, iters=args.decode_iters)
  ms_quant = time_fn(quant, q, kq, vq, lengths, ks, vs, iters=args.decode_iters)
  err = rel_err(quant(q, kq, vq, lengths, ks, vs), plain(q, k, v, lengths))
  return [Row("decode int8", "ragged_decode int8 KV", shape, ms_quant,
              valid_bytes / (ms_plain * 1e-3) / 1e9, "GB/s (bf16-equivalent)",
              ratio=ms_plain / ms_quant, max_err=err,
              status="ok" if err < 5e-2 else "MISMATCH")]


# ---- whole layer ---------------------------------------------------------------------


def bench_layer(args, platform: str) -> list[Row]:
  """Train step fwd+bwd of the whole layer (projections, RoPE, attention, out
  projection) vs flax.nnx.MultiHeadAttention and vs projections + the bare kernel."""
  from flax import nnx
  from meshattn.layers import Attention

  dtype = jnp.dtype(args.dtype)
  b, t, d = args.layer_batch, args.layer_seq, args.emb
  n, k, h = args.heads, args.kv_heads, args.head_dim
  x = jax.random.normal(jax.random.key(3), (b, t, d), dtype)
  shape = f"b{b} s{t} emb{d} n{n} k{k} h{h}"
  flops = 3.5 * 4 * b * n * t * t * h / 2 + 3 * 2 * b * t * d * (n + 2 * k) * h + 3 * 2 * b * t * n * h * d

  def train_step(model):
    @nnx.jit
    def step(model, x):
      return nnx.grad(lambda m, x: jnp.sum(m(x).astype(jnp.float32)), argnums=(0, 1))(model, x)
    return lambda x: step(model, x)

  ours = Attention(emb_dim=d, num_query_heads=n, num_kv_heads=k, head_dim=h, dtype=dtype,
                   weight_dtype=dtype, attention="autoselected", rngs=nnx.Rngs(0))
  flax_mha = nnx.MultiHeadAttention(num_heads=n, in_features=d, qkv_features=n * h, dtype=dtype,
                                    param_dtype=dtype, decode=False, rngs=nnx.Rngs(0))
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  flax_step = nnx.jit(lambda m, x: nnx.grad(
      lambda m, x: jnp.sum(m(x, mask=causal).astype(jnp.float32)), argnums=(0, 1))(m, x))

  kernel = registry.select("autoselected", registry.Request(
      platform, "train", frozenset({"causal", "gqa", "backward"} | ({"float32"} if dtype == jnp.float32 else set())))).load()
  wq = jax.random.normal(jax.random.key(4), (d, n, h), dtype) * d ** -0.5
  wk = jax.random.normal(jax.random.key(5), (d, k, h), dtype) * d ** -0.5
  wv = jax.random.normal(jax.random.key(6), (d, k, h), dtype) * d ** -0.5
  wo = jax.random.normal(jax.random.key(7), (n, h, d), dtype) * (n * h) ** -0.5
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  options = KernelOptions(mask=MaskSpec("global"), scale=h ** -0.5)

  def bare(params, x):
    wq, wk, wv, wo = params
    q = jnp.einsum("BTD,DNH->BTNH", x, wq)
    kk = jnp.einsum("BTD,DKH->BTKH", x, wk)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv)
    ctx = kernel(q, kk, v, options=options, q_positions=pos, kv_positions=pos)[0]
    return jnp.sum(jnp.einsum("BTNH,NHD->BTD", ctx, wo).astype(jnp.float32))

  bare_step = jax.jit(jax.grad(bare, argnums=(0, 1)))
  candidates = [("flax nnx.MultiHeadAttention", lambda x: flax_step(flax_mha, x)),
                ("projections + bare kernel", lambda x: bare_step((wq, wk, wv, wo), x)),
                ("meshattn Attention", train_step(ours))]
  rows, baseline = [], None
  for name, fn in candidates:
    try:
      ms = time_fn(fn, x, iters=args.iters)
    except Exception as error:
      rows.append(Row("layer fwd+bwd", name, shape, None, None, "TFLOP/s", status=failed(error)))
      continue
    rate = flops / (ms * 1e-3) / 1e12
    baseline = baseline or rate
    rows.append(Row("layer fwd+bwd", name, shape, ms, rate, "TFLOP/s", ratio=rate / baseline))
  return rows


# ---- output --------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
  header = ["section", "kernel", "shape", "ms", "rate", "x baseline", "max err", "status"]
  body = [[r.section, r.kernel, r.shape, "" if r.ms is None else f"{r.ms:.3f}",
           "" if r.rate is None else f"{r.rate:.4g} {r.unit}",
           "" if r.ratio is None else f"{r.ratio:.2f}",
           "" if r.max_err is None else f"{r.max_err:.1e}", r.status] for r in rows]
  widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
  for line in [header, ["-" * w for w in widths]] + body:
    print("  ".join(c.ljust(w) for c, w in zip(line, widths)))


def write_plot(rows: list[Row], path: pathlib.Path) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  sections = sorted({r.section for r in rows if r.rate is not None})
  if not sections:  # e.g. only the steps section: times and ratios, no rates to plot
    return False
  fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4), squeeze=False)
  for ax, section in zip(axes[0], sections):
    picked = [r for r in rows if r.section == section and r.rate is not None]
    labels = [f"{r.kernel}\n{r.shape}" for r in picked]
    ax.barh(range(len(picked)), [r.rate for r in picked])
    ax.set_yticks(range(len(picked)), labels, fontsize=6)
    ax.set_title(f"{section} ({picked[0].unit})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


# The sections in the order they run (--sections picks which).
SECTIONS: dict[str, Callable[..., list[Row]]] = {
    "prefill": bench_prefill, "features": bench_features, "long": bench_long,
    "decode": bench_decode, "layer": bench_layer, "steps": bench_layer_steps.steps_section,
    "linear": bench_linear}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--prefill", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                 default=[(4, 4096), (1, 16384)], help="BATCHxSEQ entries")
  p.add_argument("--features-shape", type=lambda s: tuple(int(x) for x in s.split("x")),
                 default=(4, 4096), help="BATCHxSEQ of the features section")
  p.add_argument("--long", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                 default=[(1, 65536)], help="BATCHxSEQ entries of the long section")
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
  p.add_argument("--decode", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                 default=[(64, 4096), (8, 32768)], help="BATCHxKVLEN entries")
  p.add_argument("--tokens-per-page", type=int, default=16)
  p.add_argument("--emb", type=int, default=4096, help="layer section: model width")
  p.add_argument("--layer-batch", type=int, default=4)
  p.add_argument("--layer-seq", type=int, default=4096)
  p.add_argument("--sections", nargs="+",
                 default=["prefill", "features", "decode", "layer", "steps"], choices=list(SECTIONS))
  p.add_argument("--steps-decode", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="*",
                 default=[(64, 4096), (8, 32768)], help="steps section: BATCHxKVLEN of the decode step")
  p.add_argument("--steps-caches", nargs="+", default=["contiguous", "paged", "int8"],
                 choices=["contiguous", "paged", "int8"])
  p.add_argument("--steps-prefill", type=lambda s: tuple(int(x) for x in s.split("x")),
                 default=(8, 4096, 512), help="steps section: BATCHxPROMPTxCHUNK")
  p.add_argument("--linear-train", type=lambda s: tuple(int(x) for x in s.split("x")),
                 default=(1, 65536), help="linear section: BATCHxSEQ of fwd+bwd vs flash")
  p.add_argument("--linear-chunks", type=int, nargs="+", default=[64, 128, 256],
                 help="linear section: chunk sizes timed")
  p.add_argument("--linear-decode", type=lambda s: tuple(int(x) for x in s.split("x")),
                 nargs="+", default=[(8, 4096), (8, 65536)],
                 help="linear section: BATCHxKVLEN of the decode step, linear vs softmax")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--decode-iters", type=int, default=200,
                 help="calls per timed sample in the decode section: its kernels take 0.1-0.5 ms; "
                      "at 10-20 calls per sample readings spread up to 20%% between runs on the "
                      "H200, at 200 within 1.2%% (docs/benchmarks.md, 2026-11-30 second entry)")
  p.add_argument("--check", action="store_true", help="compare each kernel with the reference first")
  p.add_argument("--max-reference-seq", type=int, default=8192,
                 help="longest sequence the O(s^2) reference checks against")
  p.add_argument("--out", default="bench_out")
  p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes for a CPU run")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.prefill, args.heads, args.kv_heads, args.head_dim = [(1, 64)], 4, 2, 32
    args.features_shape, args.long = (1, 64), [(1, 128)]
    args.emb, args.layer_batch, args.layer_seq = 128, 1, 64
    args.decode, args.tokens_per_page, args.iters, args.dtype = [(4, 64)], 16, 2, "float32"
    args.decode_iters = 2
    args.linear_train, args.linear_chunks, args.linear_decode = (1, 96), [40], [(2, 64), (2, 128)]
    args.steps_decode, args.steps_prefill = [(2, 32)], (2, 32, 8)
  return args


def main(argv: list[str]) -> int:
  args = parse(argv)
  platform = registry.current_platform()
  print(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}, dtype {args.dtype}")
  rows = []
  for name, section in SECTIONS.items():
    if name in args.sections:
      rows += section(args, platform)
  print_table(rows)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"device": jax.devices()[0].device_kind, "platform": platform, "jax": jax.__version__,
          "args": {k: v for k, v in vars(args).items()}}
  (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]},
                                             indent=1, default=str))
  if write_plot(rows, out / "bench.png"):
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
  else:
    print(f"wrote {out / 'bench.json'} (no plot: no matplotlib, or no rates to plot)")
  return 1 if any(r.status == "MISMATCH" for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
