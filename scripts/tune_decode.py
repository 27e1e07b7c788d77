"""Sweep the Pallas decode kernels' tunables and report which settings are fastest.

    JAX_PLATFORMS=cuda,cpu python scripts/tune_decode.py --out $OUT [--quick]
    python scripts/tune_decode.py --cpu-smoke --out /tmp/tune   # interpret mode, tiny shapes

Kernels: "ragged" (bfloat16 K/V), "paged" (bfloat16, 16-token pages in
random pool order) and "ragged int8" (int8 K/V with per token-and-head
float32 scales, kvcache.quant's default layout), each at the shapes of the
decode benchmark (scripts/bench.py: 32 query heads, 8 kv heads, head_dim
128; uniform lengths, or lengths uniform in [1, max]; the same random keys):
b64 kv4096 uniform, b64 max8192 ragged, b64 max4096 ragged, b8 kv32768
uniform.

Every configuration is first checked against the reference (pure JAX over
the same cache): a mismatch is reported and not timed, one that fails to
compile (e.g. a pipeline too deep for shared memory) is reported with its
error and skipped. Timing: `iters` calls dispatched back to back and one
sync (the GPU time of a call, host dispatch overlapped), best of `reps`;
`ms_sync` is bench.py's way (a sync after every call, so it includes host
latency: compare it with bench.py's numbers). GB/s counts only valid K/V
bytes (and the int8 scales), and `frac` divides it by a device-to-device
copy's bandwidth measured in the same run. int8 rows also give their
speedup over the fastest bfloat16 ragged configuration at the same shape.

The search is staged and time-boxed (--budget-s, default 240 s): every
(kernel, shape) gets an equal share of what is left and runs its candidates
in priority order (the automatic choice first, then the split size, the tile
size, warps and pipeline stages), so the whole run stays under 5 minutes on
an H100 however slow compilation is; candidates cut by the budget are
listed as skipped. --quick runs the automatic configuration and one
alternative per kernel on two shapes (12 runs). Writes tune_decode.json under --out.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp

from meshattn.kvcache.quant import KVQuant, quantize, scales_by_head
from meshattn.layers.kernels.decode import decode_splits
from meshattn.layers.kernels.decode.paged import paged_decode_pallas
from meshattn.layers.kernels.decode.ragged import ragged_decode_pallas, ragged_decode_reference
from meshattn.scripts.bench_common import (
    copy_bandwidth, fmt, rel_err, time_fn, time_synced, to_pages)
from meshattn.scripts.tune_common import (
    TimeBox, past_share, sweep_platform, tuning_parser, write_results)


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  max_len: int
  ragged: bool

  @property
  def name(self) -> str:
    return (f"b{self.batch} max{self.max_len} ragged" if self.ragged
            else f"b{self.batch} kv{self.max_len} uniform")


GPU_SHAPES = (Shape(64, 4096, False), Shape(64, 8192, True), Shape(64, 4096, True),
              Shape(8, 32768, False))
SMOKE_SHAPES = (Shape(4, 64, True),)  # ragged lengths (one row may be full)

KERNELS = ("ragged", "paged", "ragged int8")

# Candidates per kernel, in priority order ({} = every tunable automatic).
# Tile sizes: block_kv (keys per step) for ragged, pages_per_block for paged
# (16-token pages: 8 pages = 128 tokens); blocks_per_split counts loop steps.
# Shared memory decides programs per SM (Triton 3.9, sm_90, offline compile):
# 128 bfloat16 keys at 2 stages ~72 KB (3 per SM), at 3 stages ~136 KB (1);
# 64 keys at 3 stages ~70 KB (3). int8 K/V under a bfloat16 query run int8
# dots on the tiles as loaded: 64 keys at 3 stages ~40 KB, but 168 registers
# per thread allow 3 programs per SM (ncu, jax 0.11.2).
CANDIDATES = {
    "ragged": [{}, dict(blocks_per_split=4), dict(blocks_per_split=16), dict(num_warps=2),
               dict(num_warps=8),
               dict(block_kv=64, num_stages=3), dict(block_kv=64), dict(block_kv=256),
               dict(blocks_per_split=32), dict(num_splits=1),
               dict(block_kv=64, num_stages=3, num_warps=8), dict(block_kv=64, num_stages=4),
               dict(num_stages=3)],
    "paged": [{}, dict(blocks_per_split=4), dict(blocks_per_split=16), dict(num_warps=2),
              dict(num_warps=8),
              dict(pages_per_block=4, num_stages=3), dict(pages_per_block=4),
              dict(pages_per_block=16), dict(blocks_per_split=32), dict(num_splits=1),
              dict(pages_per_block=4, num_stages=3, num_warps=8), dict(num_stages=3)],
    "ragged int8": [{}, dict(num_warps=2), dict(num_warps=2, block_kv=128),
                    dict(num_warps=2, num_stages=4), dict(num_warps=2, blocks_per_split=16),
                    dict(blocks_per_split=4), dict(blocks_per_split=16),
                    dict(block_kv=256, num_warps=8), dict(block_kv=64, num_stages=3),
                    dict(num_warps=8), dict(block_kv=256), dict(num_stages=3),
                    dict(blocks_per_split=32), dict(block_kv=64, num_stages=4),
                    dict(block_kv=256, num_warps=8, blocks_per_split=4)],
}
QUICK_CANDIDATES = {
    "ragged": [{}, dict(blocks_per_split=4)],
    "paged": [{}, dict(blocks_per_split=4)],
    "ragged int8": [{}, dict(block_kv=256, num_warps=8)],
}
QUICK_SHAPES = (Shape(64, 4096, False), Shape(64, 4096, True))
SMOKE_CANDIDATES = {
    "ragged": [{}, dict(block_kv=16, blocks_per_split=1, num_warps=8, num_stages=3)],
    "paged": [{}, dict(pages_per_block=2, blocks_per_split=1)],
    "ragged int8": [{}, dict(block_kv=16, num_splits=2)],
}

TOLERANCE = 2e-2  # relative max error vs the reference (bfloat16 outputs)


@dataclasses.dataclass
class Row:
  kernel: str
  shape: str
  config: str
  ms: float | None = None
  ms_sync: float | None = None
  gbps: float | None = None
  frac: float | None = None  # of the copy bandwidth
  speedup: float | None = None  # int8: vs the fastest bfloat16 ragged config of the shape
  max_err: float | None = None
  status: str = "ok"
  params: dict = dataclasses.field(default_factory=dict)


def config_name(config: dict) -> str:
  short = {"block_kv": "bk", "pages_per_block": "ppb", "blocks_per_split": "bps",
           "num_splits": "splits", "num_warps": "w", "num_stages": "st"}
  return " ".join(f"{short[k]}{v}" for k, v in config.items()) or "auto"


def time_call(fn: Callable, args, *, iters: int, reps: int) -> tuple[float, float]:
  """(ms per call dispatched back to back; ms with a sync after each call)."""
  return time_fn(fn, *args, iters=iters, reps=reps), time_synced(fn, *args, iters=iters)


@dataclasses.dataclass
class Problem:
  """One shape's inputs, the callables per kernel and their references."""
  shape: Shape
  lengths: jax.Array
  fns: dict  # kernel -> (fn(config) -> jitted callable, args, reference, valid bytes)


def make_problem(shape: Shape, *, heads, kv_heads, head_dim, dtype, tpp, interpret) -> Problem:
  b, s = shape.batch, shape.max_len
  keys = jax.random.split(jax.random.key(1), 4)  # bench.py's keys: the same data
  q = jax.random.normal(keys[0], (b, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (b, s, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (b, s, kv_heads, head_dim), dtype)
  lengths = (jax.random.randint(keys[3], (b,), 1, s + 1) if shape.ragged
             else jnp.full((b,), s, jnp.int32)).astype(jnp.int32)
  scale = head_dim ** -0.5
  tokens = float(jnp.sum(lengths))
  float_bytes = tokens * kv_heads * head_dim * 2 * jnp.dtype(dtype).itemsize
  common = dict(scale=scale, backend="gpu", interpret=interpret)
  ref = jax.jit(lambda q, k, v, l: ragged_decode_reference(q, k, v, l, scale=scale))(q, k, v, lengths)

  def ragged(config):
    return jax.jit(lambda q, k, v, l: ragged_decode_pallas(q, k, v, l, **common, **config))

  key_pages, value_pages, table = to_pages(k, v, tpp)
  slots = jnp.arange(b, dtype=jnp.int32)  # row i is slot i, owning the pages of its table
  owner = jnp.full(key_pages.shape[:1], -1, jnp.int32).at[table].set(slots[:, None])  # [P]
  # The paged reference is the ragged one on the same logical cache (checked
  # equal by the tests); gathering pages here would only cost memory.

  def paged(config):
    return jax.jit(lambda q, kp, vp, t, l, o, s: paged_decode_pallas(
        q, kp, vp, t, l, page_owner=o, slots=s, **common, **config))

  quant = KVQuant("int8")
  kq, ks = quantize(k, quant)
  vq, vs = quantize(v, quant)
  ks, vs = scales_by_head(ks), scales_by_head(vs)  # [B, K, S], as the cache stores them
  ref8 = jax.jit(lambda q, k, v, l, ks, vs: ragged_decode_reference(
      q, k, v, l, scale=scale, key_scale=ks, value_scale=vs))(q, kq, vq, lengths, ks, vs)
  int8_bytes = tokens * kv_heads * (head_dim + 4) * 2  # int8 values + float32 scales

  def ragged8(config):
    return jax.jit(lambda q, k, v, l, ks, vs: ragged_decode_pallas(
        q, k, v, l, key_scale=ks, value_scale=vs, **common, **config))

  return Problem(shape, lengths, {
      "ragged": (ragged, (q, k, v, lengths), ref, float_bytes),
      "paged": (paged, (q, key_pages, value_pages, table, lengths, owner, slots), ref, float_bytes),
      "ragged int8": (ragged8, (q, kq, vq, lengths, ks, vs), ref8, int8_bytes),
  })


def run_config(problem: Problem, kernel: str, config: dict, *, iters, reps, bandwidth) -> Row:
  make, call_args, ref, nbytes = problem.fns[kernel]
  row = Row(kernel, problem.shape.name, config_name(config), params=dict(config))
  try:
    fn = make(config)
    out = fn(*call_args)
    row.max_err = rel_err(out, ref)
  except Exception as error:  # noqa: BLE001 -- a config the compiler refuses (shared memory, ...)
    row.status = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:100]}"
    return row
  if not row.max_err <= TOLERANCE:
    row.status = "MISMATCH"
    return row
  row.ms, row.ms_sync = time_call(fn, call_args, iters=iters, reps=reps)
  row.gbps = nbytes / (row.ms * 1e-3) / 1e9
  row.frac = row.gbps / bandwidth
  return row


def geomean_best(rows: list[Row], kernel: str, shapes: list[str]) -> tuple[str, float] | None:
  """The config with the best geometric mean of ms / (best ms of the shape) over all shapes."""
  timed = [r for r in rows if r.kernel == kernel and r.ms is not None]
  best = {s: min((r.ms for r in timed if r.shape == s), default=None) for s in shapes}
  scores = {}
  for name in {r.config for r in timed}:
    ratios = [r.ms / best[r.shape] for r in timed if r.config == name]
    if len(ratios) == len(shapes):
      scores[name] = math.exp(sum(map(math.log, ratios)) / len(ratios))
  if not scores:
    return None
  name = min(scores, key=scores.get)
  return name, scores[name]


def print_table(rows: list[Row]):
  header = (f"{'kernel':<12} {'shape':<20} {'config':<22} {'ms':>8} {'ms_sync':>8} "
            f"{'GB/s':>8} {'frac':>6} {'x bf16':>7} {'err':>8}  status")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r.kernel:<12} {r.shape:<20} {r.config:<22} {fmt(r.ms, '8.4f')} "
          f"{fmt(r.ms_sync, '8.4f')} {fmt(r.gbps, '8.1f')} {fmt(r.frac, '6.3f')} "
          f"{fmt(r.speedup, '7.2f')} {fmt(r.max_err, '8.1e')}  {r.status}")


def parse(argv):
  p = tuning_parser(__doc__, "tune_decode.json", quick_help="2 configs per kernel on 2 shapes",
                    budget_s=240.0,
                    budget_help="wall-clock budget of the sweep (per-shape data set-up included)")
  p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--tokens-per-page", type=int, default=16)
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.heads, args.kv_heads, args.head_dim, args.tokens_per_page = 4, 2, 16, 8
    args.iters, args.reps = 2, 1
  return args


def main(argv: list[str]) -> int:
  args = parse(argv)
  platform = sweep_platform(args)
  if platform is None:
    return 2
  interpret = args.cpu_smoke
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({platform}, {decode_splits.sm_count()} SMs), "
        f"jax {jax.__version__}")
  shapes = SMOKE_SHAPES if interpret else (QUICK_SHAPES if args.quick else GPU_SHAPES)
  candidates = (SMOKE_CANDIDATES if interpret else
                QUICK_CANDIDATES if args.quick else CANDIDATES)
  dtype = jnp.bfloat16
  biggest = max(s.batch * s.max_len for s in shapes) * args.kv_heads * args.head_dim * 2 * 2
  bandwidth = copy_bandwidth(biggest, iters=args.iters, reps=args.reps)
  print(f"device copy: {bandwidth:.1f} GB/s ({biggest / 2**20:.0f} MiB)")
  # int8 speedups are against the best bfloat16 ragged config: KERNELS runs that first.
  kernels = [k for k in KERNELS if k in args.kernels]
  budget = TimeBox(args.budget_s, len(shapes) * len(kernels))
  rows: list[Row] = []
  for shape in shapes:
    problem = make_problem(shape, heads=args.heads, kv_heads=args.kv_heads,
                           head_dim=args.head_dim, dtype=dtype, tpp=args.tokens_per_page,
                           interpret=interpret)
    for kernel in kernels:
      share_end = budget.next_share()
      for i, config in enumerate(candidates[kernel]):
        if past_share(i, share_end):
          rows.append(Row(kernel, shape.name, config_name(config), status="skipped (budget)",
                          params=dict(config)))
          continue
        row = run_config(problem, kernel, config, iters=args.iters, reps=args.reps,
                         bandwidth=bandwidth)
        rows.append(row)
        print(f"  {kernel:<12} {shape.name:<20} {row.config:<22} "
              f"{fmt(row.ms, '.4f')} ms  {fmt(row.frac, '.3f')}  {row.status}", flush=True)
    bf16 = [r.ms for r in rows if r.kernel == "ragged" and r.shape == shape.name and r.ms]
    for r in rows:
      if r.kernel == "ragged int8" and r.shape == shape.name and r.ms and bf16:
        r.speedup = min(bf16) / r.ms
    del problem
  print()
  print_table(rows)
  print()
  summary = {}
  for kernel in kernels:
    for shape in shapes:
      timed = [r for r in rows if r.kernel == kernel and r.shape == shape.name and r.ms]
      if timed:
        best = min(timed, key=lambda r: r.ms)
        auto = next((r for r in timed if r.config == "auto"), None)
        gain = f", {auto.ms / best.ms:.2f}x vs auto" if auto else ""
        extra = f", {best.speedup:.2f}x vs bf16" if best.speedup else ""
        print(f"best {kernel:<12} {shape.name:<20} {best.config:<22} {best.ms:.4f} ms  "
              f"frac {best.frac:.3f}{gain}{extra}")
        summary.setdefault(kernel, {})[shape.name] = dataclasses.asdict(best)
    overall = geomean_best(rows, kernel, [s.name for s in shapes])
    if overall:
      print(f"best {kernel:<12} over all shapes: {overall[0]} (geomean {overall[1]:.3f}x the "
            "per-shape best)")
      summary.setdefault(kernel, {})["overall"] = {"config": overall[0], "geomean": overall[1]}
  meta = {"device": device.device_kind, "platform": platform, "jax": jax.__version__,
          "sm_count": decode_splits.sm_count(), "copy_gbps": bandwidth,
          "interpret": interpret, "args": vars(args)}
  write_results(args.out, "tune_decode.json", meta, rows, summary)
  failed = [r for r in rows if r.status == "MISMATCH"]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
