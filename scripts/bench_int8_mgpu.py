"""Benchmark the experimental Mosaic GPU int8 decode kernel (layers/kernels/decode/decode_int8_mgpu.py).

    JAX_PLATFORMS=cuda,cpu python scripts/bench_int8_mgpu.py --out $OUT [--shapes 64x4096 ...]

Hopper only. Shapes are bench.py's decode shapes (32 query heads, 8 kv
heads, head_dim 128), given as BATCHxKV_LEN for full-length rows,
BATCHxMAXr for lengths uniform in [1, MAX], or BATCHxMAXs for skewed rows
(every 8th row MAX long, the others MAX / 16). For each shape, in one run: the
landed bfloat16 Triton kernel (the baseline of every ratio), the landed
Triton int8 kernel, and the Mosaic GPU kernel at two tilings (automatic
splits) and at given split counts, all over the cache's layout (scales
head-major [B, K, S]). Each kernel is first checked against the reference
(ragged_decode_reference over the same int8 cache) and not timed if it
disagrees; the Mosaic kernel is also checked with attention sinks, and at
the first shape with edge row lengths (empty, around tile boundaries,
full, past the cache) and 3 splits. --ablations adds, at the first shape,
variants that leave a stage out (their results are wrong on purpose) to
show where the time goes. Prints a table; writes bench_int8_mgpu.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head
from meshattn.layers.kernels.decode.decode_int8_mgpu import BLOCK_KV, auto_splits, int8_decode_mgpu
from meshattn.layers.kernels.decode.ragged import ragged_decode_pallas, ragged_decode_reference
from meshattn.scripts.bench_common import failed, rel_err, time_fn

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TILINGS = ((64, 2), (64, 3))  # (block_kv, stages), automatic splits; the default first
ABLATIONS = (("TMA stream only", "tma_only"), ("no V conversion", "no_v_conversion"))
# Relative error against the reference above which a kernel is not timed
# (bfloat16 p and output rounding: the kernels give 2e-3 to 6e-3). The edge
# lengths below make an off-by-one key show: one key of a 64-key row moves
# the output by about 1/64.
TOLERANCE = 1e-2
# Row lengths at tile and split boundaries, empty rows and rows past the
# cache, checked (not timed) with sinks and 3 splits at the first shape.
EDGE_LENGTHS = (0, 1, 63, 64, 65, 127, 128, 129)


def _inputs(batch: int, kv_len: int):
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (batch, HEADS, HEAD_DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, kv_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, kv_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  return q, k, v


LENGTHS = {"": "full", "r": "uniform", "s": "skewed"}  # shape suffix -> row lengths


def row_lengths(batch: int, kv_len: int, kind: str) -> jax.Array:
  """[B] int32 row lengths: full, uniform in [1, kv_len], or skewed (1 row in 8 full)."""
  if kind == "uniform":
    return jax.random.randint(jax.random.key(2), (batch,), 1, kv_len + 1, jnp.int32)
  if kind == "skewed":
    return jnp.where(jnp.arange(batch) % 8 == 0, kv_len, kv_len // 16).astype(jnp.int32)
  return jnp.full((batch,), kv_len, jnp.int32)


def bench_shape(batch: int, kv_len: int, kind: str, *, ablations: bool,
                splits: list[int] | None = None, edge_lengths: bool = False) -> list[dict]:
  q, k, v = _inputs(batch, kv_len)
  lengths = row_lengths(batch, kv_len, kind)
  kq, ks = quantize(k, KVQuant("int8"))  # [B, S, K, H] int8, [B, S, K] f32
  vq, vs = quantize(v, KVQuant("int8"))
  ks, vs = scales_by_head(ks), scales_by_head(vs)  # [B, K, S], as the cache stores them
  scale = HEAD_DIM ** -0.5
  iters = max(20, 200 * 64 * 4096 // (batch * kv_len))
  ref = ragged_decode_reference(q, kq, vq, lengths, scale=scale, key_scale=ks, value_scale=vs)
  sinks = jax.random.normal(jax.random.key(3), (HEADS,), jnp.float32)

  def mgpu(**kw):
    return jax.jit(lambda q, k, v, l, a, c: int8_decode_mgpu(q, k, v, l, a, c, scale=scale, **kw))

  bf16 = jax.jit(lambda q, k, v, l: ragged_decode_pallas(q, k, v, l, scale=scale))
  triton = jax.jit(lambda q, k, v, l, a, c: ragged_decode_pallas(
      q, k, v, l, scale=scale, key_scale=a, value_scale=c))
  base_ms = time_fn(bf16, q, k, v, lengths, iters=iters)
  rows = [dict(kernel="triton bf16 (baseline)", ms=base_ms, x=1.0,
               err=rel_err(bf16(q, k, v, lengths), ref))]
  args = (q, kq, vq, lengths, ks, vs)
  auto = auto_splits(batch * KV_HEADS, kv_len // BLOCK_KV)
  candidates = [("triton int8", triton, True)]
  for bk, st in TILINGS:
    candidates.append((f"mgpu int8 bk{bk} st{st}", mgpu(block_kv=bk, stages=st), True))
  for p in splits or [2 * auto]:
    candidates.append((f"mgpu int8 splits {p}", mgpu(num_splits=p), True))
  if ablations:
    for name, which in ABLATIONS:
      candidates.append((f"ablation: {name}", mgpu(ablation=which), False))
  for name, fn, check in candidates:
    row = dict(kernel=name)
    try:
      err = rel_err(fn(*args), ref)
      row["err"] = err
      if check and not err <= TOLERANCE:
        row["status"] = f"disagrees with the reference (rel err {err:.1e}): not timed"
      else:
        row["ms"] = time_fn(fn, *args, iters=iters)
        row["x"] = base_ms / row["ms"]
    except Exception as e:  # noqa: BLE001 - a row per failure, the run goes on
      row["status"] = failed(e)
    rows.append(row)
  checks = [("mgpu int8 with sinks (checked only)", lengths, dict(sinks=sinks))]
  if edge_lengths:
    edge = jnp.array([EDGE_LENGTHS[i % len(EDGE_LENGTHS)] for i in range(batch)], jnp.int32)
    edge = edge.at[-2:].set(jnp.array([kv_len, kv_len + 100], jnp.int32))
    checks.append(("mgpu int8 edge lengths, sinks, 3 splits", edge,
                   dict(sinks=sinks, num_splits=3)))
  for name, lens, kw in checks:
    try:
      want = ragged_decode_reference(q, kq, vq, lens, scale=scale, key_scale=ks,
                                     value_scale=vs, sinks=kw["sinks"])
      got = jax.jit(lambda *a, kw=kw: int8_decode_mgpu(*a, scale=scale, **kw))(
          q, kq, vq, lens, ks, vs)
      err = rel_err(got, want)
      rows.append(dict(kernel=name, err=err,
                       status="ok" if err <= TOLERANCE else "disagrees with the reference"))
    except Exception as e:  # noqa: BLE001
      rows.append(dict(kernel=name, status=failed(e)))
  for row in rows:
    row.update(batch=batch, kv_len=kv_len, lengths=kind, auto_splits=auto)
  return rows


def print_table(rows: list[dict]) -> None:
  print(f"{'shape':14s} {'kernel':34s} {'ms':>8s} {'x bf16':>7s} {'rel err':>8s}")
  for r in rows:
    ms = f"{r['ms']:.4f}" if "ms" in r else "-"
    x = f"{r['x']:.3f}" if "x" in r else "-"
    err = f"{r['err']:.1e}" if "err" in r else "-"
    shape = f"b{r['batch']} {dict(full='kv', uniform='max', skewed='skew')[r['lengths']]}{r['kv_len']}"
    line = f"{shape:14s} {r['kernel']:34s} {ms:>8s} {x:>7s} {err:>8s}"
    print(line + (f"  {r['status']}" if "status" in r else ""))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--shapes", nargs="+",
                      default=["64x4096", "64x8192", "8x32768", "64x8192r", "64x4096r",
                               "64x4096s"])
  parser.add_argument("--ablations", action="store_true")
  parser.add_argument("--splits", nargs="*", type=int,
                      help="split counts to try at the default tiling (default: twice the "
                           "automatic one)")
  args = parser.parse_args(argv)
  rows = []
  for i, shape in enumerate(args.shapes):
    size, suffix = shape.rstrip("rs"), shape[len(shape.rstrip("rs")):]
    batch, kv_len = (int(x) for x in size.split("x"))
    rows += bench_shape(batch, kv_len, LENGTHS[suffix], ablations=args.ablations and i == 0,
                        splits=args.splits, edge_lengths=i == 0)
  device = jax.devices()[0]
  print(f"{device.device_kind}, jax {jax.__version__}")
  print_table(rows)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "bench_int8_mgpu.json").write_text(json.dumps(
      dict(device=device.device_kind, jax=jax.__version__, rows=rows), indent=1))


if __name__ == "__main__":
  main()
