"""Sweep the Pallas GPU flash kernel's tiles and Triton settings against cuDNN.

    JAX_PLATFORMS=cuda,cpu python scripts/tune_flash_pallas_gpu.py --out $OUT [--quick]
    python scripts/tune_flash_pallas_gpu.py --cpu-smoke --out /tmp/tune   # interpret mode, tiny

Shape (flags change it): bfloat16, b4 s4096, 32 query heads, 8 kv heads,
head_dim 128. Three cases, all causal: plain; soft cap 50; segment ids
(4 equal packed documents per row) + sinks. For each case:
  fwd      the forward over FWD_CANDIDATES: (block_q, block_kv, num_warps,
           num_stages);
  fwd+bwd  jax.grad of sum(out * cotangent) over BWD_CANDIDATES, the backward's
           (block_q_bwd, block_kv_bwd) for dq, (block_q_dkv, block_kv_dkv) for
           dkv, num_warps_bwd, num_stages_bwd; the forward runs with the
           case's fastest forward configuration.
Every configuration is first checked against the float32 reference
(meshattn dot_product_attention, one batch row at a time to bound its
O(s^2) memory): outputs, and for fwd+bwd the gradients (d sinks at 5x the
tolerance: a sum over every row), at 2e-2 of the reference's max |value|
for bfloat16. A mismatch is reported and not timed; a configuration whose
tiles need more shared memory than the GPU has per block (the model in
layers/kernels/train/flash_pallas_gpu_tiles.py) is refused before compiling, and
one that fails to compile otherwise, reported and skipped. At --head-dim 256
most h128 candidates are refused that way; the kernel's defaults there (None
in every knob) are flash_pallas_gpu_tiles.Tiles.get_default's.
Timing: median of --iters calls after a compile and a warm-up call, each
synced (as scripts/bench.py). cuDNN plain causal (jax.nn.dot_product_attention,
implementation="cudnn") is timed in the same run: `x cuDNN` = cuDNN ms / ms
(> 1: faster than cuDNN; the segments target is >= 0.8). TFLOP/s use the
causal flop count for every case, 4*b*n*s^2*h/2 forward and 3.5x that for
fwd+bwd, so they compare times.

The sweep is time-boxed (--budget-s, default 220 s, so the whole run stays
under 5 minutes on an H100; compilation dominates): every (case, mode) gets
an equal share of what is left and runs its candidates in priority order (the
kernel's default first); candidates cut by the budget are listed as skipped.
--quick runs 2 forward and 2 backward candidates per case (12 runs).
Writes tune_flash_pallas_gpu.json under --out, with the best settings per
case as pallas_gpu_flash_attention keyword arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.train.dot_product import dot_product_attention
from meshattn.layers.kernels.train.flash_pallas_gpu import pallas_gpu_flash_attention
from meshattn.layers.masks import MaskSpec
from meshattn.scripts.bench_common import TOLERANCE, failed, fmt, rel_err, time_fn
from meshattn.scripts.tune_common import (
    TimeBox, past_share, sweep_platform, tuning_parser, write_results)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  soft_cap: float | None = None
  segments: bool = False  # --documents equal packed documents per row
  sinks: bool = False


def cases(args) -> list[Case]:
  return [Case("causal"), Case(f"soft cap {args.soft_cap:g}", soft_cap=args.soft_cap),
          Case(f"segments x{args.documents} + sinks", segments=True, sinks=True)]


def _fwd(block_q, block_kv, warps, stages):
  return {"block_q": block_q, "block_kv": block_kv, "num_warps": warps, "num_stages": stages}


# Candidates in priority order. Forward: a block of queries per program, the
# keys in steps. Shared memory per program ~ (block_q + 2 * stages *
# block_kv) * head_dim * 2 bytes at bfloat16 (H100 / H200: 227 KB;
# flash_pallas_gpu_tiles.shared_memory_bytes has each kernel's), which prunes deep
# pipelines of wide key steps; 16 query rows per warp keeps the accumulator in
# registers (block_q 128: 8 warps; 4 warps tried where the key step is small).
FWD_CANDIDATES = [
    _fwd(128, 64, 8, 2),  # the kernel's default at h128
    _fwd(128, 64, 8, 3),
    _fwd(128, 128, 8, 2),
    _fwd(128, 64, 4, 3),
    _fwd(128, 32, 4, 3),
    _fwd(64, 64, 4, 3),
    _fwd(128, 64, 8, 4),
    _fwd(128, 128, 8, 3),
    _fwd(64, 128, 4, 2),
    _fwd(64, 64, 4, 4),
    _fwd(128, 32, 8, 4),
    _fwd(64, 32, 4, 4),
]


def _bwd(dq, dkv, warps, stages):
  return {"block_q_bwd": dq[0], "block_kv_bwd": dq[1], "block_q_dkv": dkv[0],
          "block_kv_dkv": dkv[1], "num_warps_bwd": warps, "num_stages_bwd": stages}


# Backward: dq holds a block of queries and steps over keys, dkv the reverse,
# so each likes a large block of its own rows and a small step (FlashAttention
# 2's Triton backward: dq 128 x 32, dkv 32 x 128).
BWD_CANDIDATES = [
    _bwd((128, 64), (128, 64), 8, 2),  # the kernel's default at h128 (the forward's tiles)
    _bwd((128, 32), (32, 128), 4, 3),
    _bwd((128, 32), (32, 128), 8, 2),
    _bwd((64, 64), (64, 64), 4, 2),
    _bwd((128, 32), (32, 128), 4, 2),
    _bwd((64, 64), (64, 64), 4, 3),
    _bwd((128, 64), (64, 128), 8, 2),
    _bwd((64, 32), (32, 64), 4, 3),
    _bwd((128, 32), (32, 128), 8, 3),
    _bwd((64, 64), (64, 128), 8, 2),
]
QUICK = (FWD_CANDIDATES[:2], BWD_CANDIDATES[:2])
SMOKE = ([_fwd(32, 16, 4, 2)],
         [_bwd((32, 16), (16, 32), 4, 2)])


@dataclasses.dataclass
class Row:
  case: str
  mode: str  # "fwd" or "fwd+bwd"
  config: str
  params: dict = dataclasses.field(default_factory=dict)
  ms: float | None = None
  tflops: float | None = None
  x_cudnn: float | None = None  # baseline ms / ms
  max_err: float | None = None
  status: str = "ok"


def config_name(config: dict) -> str:
  if "block_q" in config:
    return (f"q{config['block_q']} kv{config['block_kv']} w{config['num_warps']} "
            f"s{config['num_stages']}")
  return (f"dq {config['block_q_bwd']}x{config['block_kv_bwd']} dkv {config['block_q_dkv']}x"
          f"{config['block_kv_dkv']} w{config['num_warps_bwd']} s{config['num_stages_bwd']}")


@dataclasses.dataclass
class Problem:
  """One case's inputs and its float32 reference output and gradients."""
  case: Case
  args: tuple  # (q, k, v, sinks)
  extras: dict  # positions, segment ids, cotangent
  options: KernelOptions
  ref_out: jax.Array
  ref_grads: tuple


def _row(x, i: int):
  return None if x is None else x[i:i + 1]


def make_problem(case: Case, args) -> Problem:
  b, s, n, kh, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, s, n, h), dtype)  # [B, T, N, H]
  k = jax.random.normal(keys[1], (b, s, kh, h), dtype)  # [B, S, K, H]
  v = jax.random.normal(keys[2], (b, s, kh, h), dtype)  # [B, S, K, H]
  cot = jax.random.normal(keys[3], (b, s, n, h), dtype)  # [B, T, N, H]
  sinks = jax.random.normal(keys[4], (n,), jnp.float32) if case.sinks else None  # [N]
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [B, T]
  seg = None
  if case.segments:  # ids 1..documents, equal lengths
    seg = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) * args.documents // s + 1, (b, s))
  options = KernelOptions(mask=MaskSpec("global"), scale=h ** -0.5, soft_cap=case.soft_cap)
  extras = {"pos": pos, "seg": seg, "cot": cot}
  argnums = (0, 1, 2, 3) if case.sinks else (0, 1, 2)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)

  @jax.jit
  def reference_row(q, k, v, sinks, pos, seg, cot):
    def loss(q, k, v, sinks):
      out, _ = dot_product_attention(q, k, v, options=options, q_positions=pos, kv_positions=pos,
                                     q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks)
      return jnp.sum(out * cot), out
    grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(f32(q), f32(k), f32(v), sinks)
    return out, grads

  # One batch row at a time: the reference materialises [K, G, T, S] float32.
  outs, grads = [], []
  with jax.default_matmul_precision("highest"):
    for i in range(b):
      row = functools.partial(_row, i=i)
      out, g = reference_row(row(q), row(k), row(v), sinks, row(pos), row(seg), f32(row(cot)))
      outs.append(out)
      grads.append(g)
  ref_grads = tuple(jnp.concatenate([g[j] for g in grads]) for j in range(3))  # dq, dk, dv
  if case.sinks:
    ref_grads += (sum(g[3] for g in grads),)  # d sinks: summed over the rows
  return Problem(case, (q, k, v, sinks), extras, options, jnp.concatenate(outs), ref_grads)


def flash_fns(problem: Problem, config: dict, *, interpret: bool, fwd_config: dict | None = None):
  """(jitted forward, jitted grad) of the kernel with config (and fwd_config for the grad)."""
  e = problem.extras

  def run(q, k, v, sinks, config):
    return pallas_gpu_flash_attention(
        q, k, v, options=problem.options, q_positions=e["pos"], kv_positions=e["pos"],
        q_segment_ids=e["seg"], kv_segment_ids=e["seg"], sinks=sinks, interpret=interpret,
        **config)[0]

  argnums = (0, 1, 2, 3) if problem.case.sinks else (0, 1, 2)
  both = {**(fwd_config or {}), **config}
  fwd = jax.jit(lambda q, k, v, sinks: run(q, k, v, sinks, config))
  grad = jax.jit(jax.grad(
      lambda q, k, v, sinks: jnp.sum(run(q, k, v, sinks, both).astype(jnp.float32)
                                     * e["cot"].astype(jnp.float32)), argnums=argnums))
  return fwd, grad


def run_config(problem: Problem, mode: str, config: dict, *, args, flops: float, base_ms: float,
               interpret: bool, fwd_config: dict | None = None) -> Row:
  row = Row(problem.case.name, mode, config_name(config), params=dict(config))
  tol = TOLERANCE[args.dtype]
  try:
    fwd, grad = flash_fns(problem, config, interpret=interpret, fwd_config=fwd_config)
    fn = fwd if mode == "fwd" else grad
    if mode == "fwd":
      row.max_err = rel_err(fwd(*problem.args), problem.ref_out)
      ok = row.max_err <= tol
    else:
      grads = grad(*problem.args)
      errs = [rel_err(g, r) for g, r in zip(grads, problem.ref_grads)]
      row.max_err = max(errs)
      ok = all(e <= tol * (5 if i == 3 else 1) for i, e in enumerate(errs))  # 3: d sinks
  except Exception as error:  # noqa: BLE001 -- a config the compiler refuses (shared memory, ...)
    row.status = failed(error)
    return row
  if not ok:
    row.status = "MISMATCH"
    return row
  row.ms = time_fn(fn, *problem.args, iters=args.iters)
  row.tflops = (flops if mode == "fwd" else 3.5 * flops) / (row.ms * 1e-3) / 1e12
  row.x_cudnn = base_ms / row.ms if base_ms else None
  return row


def time_baseline(args, platform: str) -> dict:
  """ms of jax.nn.dot_product_attention plain causal (cuDNN on GPU), forward and fwd+bwd."""
  implementation = "cudnn" if platform == "gpu" else "xla"
  b, s, n, kh, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, s, n, h), dtype)
  k = jax.random.normal(keys[1], (b, s, kh, h), dtype)
  v = jax.random.normal(keys[2], (b, s, kh, h), dtype)
  cot = jax.random.normal(keys[3], (b, s, n, h), dtype)

  def run(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=h ** -0.5,
                                        implementation=implementation)

  fwd = jax.jit(run)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum((run(q, k, v) * cot).astype(jnp.float32)),
                          argnums=(0, 1, 2)))
  base = {"name": f"jax.nn {implementation}", "fwd": None, "fwd+bwd": None}
  try:
    base["fwd"] = time_fn(fwd, q, k, v, iters=args.iters)
    base["fwd+bwd"] = time_fn(grad, q, k, v, iters=args.iters)
  except Exception as error:  # noqa: BLE001 -- no baseline: the sweep still runs, without ratios
    base["status"] = failed(error)
  return base


def print_table(rows: list[Row], base_name: str):
  header = (f"{'case':<20} {'mode':<8} {'config':<30} {'ms':>8} {'TFLOP/s':>8} "
            f"{'x ' + base_name.split()[-1]:>8} {'err':>8}  status")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r.case:<20} {r.mode:<8} {r.config:<30} {fmt(r.ms, '8.3f')} {fmt(r.tflops, '8.1f')} "
          f"{fmt(r.x_cudnn, '8.2f')} {fmt(r.max_err, '8.1e')}  {r.status}")


def parse(argv):
  p = tuning_parser(__doc__, "tune_flash_pallas_gpu.json",
                    quick_help="2 fwd + 2 fwd+bwd configs per case", budget_s=220.0,
                    budget_help="wall-clock budget of the sweep (after the baseline)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
  p.add_argument("--soft-cap", type=float, default=50.0)
  p.add_argument("--documents", type=int, default=4, help="packed documents per row")
  p.add_argument("--cases", nargs="+", type=int, default=[0, 1, 2],
                 help="indices of the cases to run: 0 causal, 1 soft cap, 2 segments + sinks")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.batch, args.seq, args.heads, args.kv_heads, args.head_dim = 1, 128, 4, 2, 32
    args.iters, args.dtype = 2, "float32"
  return args


def main(argv: list[str]) -> int:
  args = parse(argv)
  platform = sweep_platform(args)
  if platform is None:
    return 2
  interpret = args.cpu_smoke
  device = jax.devices()[0]
  b, s, n, kh, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  shape = f"b{b} s{s} n{n} k{kh} h{h} {args.dtype}"
  print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}, {shape}")
  fwd_candidates, bwd_candidates = (SMOKE if interpret else QUICK if args.quick
                                    else (FWD_CANDIDATES, BWD_CANDIDATES))
  flops = 4 * b * n * s * s * h / 2  # causal forward
  base = time_baseline(args, platform)
  if base["fwd+bwd"]:
    print(f"baseline {base['name']} plain causal: fwd {base['fwd']:.3f} ms "
          f"({flops / base['fwd'] / 1e9:.1f} TFLOP/s), fwd+bwd {base['fwd+bwd']:.3f} ms "
          f"({3.5 * flops / base['fwd+bwd'] / 1e9:.1f} TFLOP/s)", flush=True)
  else:
    print(f"baseline {base['name']}: {base.get('status')} (no ratios)", flush=True)

  chosen = [c for i, c in enumerate(cases(args)) if i in args.cases]
  budget = TimeBox(args.budget_s, 2 * len(chosen))  # a forward and a fwd+bwd group per case
  rows: list[Row] = []
  best: dict = {}
  for case in chosen:
    try:
      problem = make_problem(case, args)
    except Exception as error:  # noqa: BLE001 -- e.g. the O(s^2) reference out of memory
      rows.append(Row(case.name, "reference", "-", status=failed(error)))
      print(f"  {case.name}: reference {failed(error)}", flush=True)
      budget.drop(2)
      continue
    fwd_best = None
    for mode, candidates in (("fwd", fwd_candidates), ("fwd+bwd", bwd_candidates)):
      share_end = budget.next_share()
      for i, config in enumerate(candidates):
        if past_share(i, share_end):
          rows.append(Row(case.name, mode, config_name(config), dict(config),
                          status="skipped (budget)"))
          continue
        row = run_config(problem, mode, config, args=args, flops=flops, base_ms=base[mode],
                         interpret=interpret, fwd_config=fwd_best)
        rows.append(row)
        print(f"  {case.name:<20} {mode:<8} {row.config:<30} {fmt(row.ms, '.3f')} ms  "
              f"{fmt(row.tflops, '.1f')} TFLOP/s  x{fmt(row.x_cudnn, '.2f')}  {row.status}",
              flush=True)
      timed = [r for r in rows if r.case == case.name and r.mode == mode and r.ms]
      if timed:
        top = min(timed, key=lambda r: r.ms)
        best.setdefault(case.name, {})[mode] = dataclasses.asdict(top)
        if mode == "fwd":
          fwd_best = top.params
    if fwd_best is not None and "fwd+bwd" in best.get(case.name, {}):
      best[case.name]["kwargs"] = {**fwd_best, **best[case.name]["fwd+bwd"]["params"]}
    del problem

  print()
  print_table(rows, base["name"])
  print()
  for case in chosen:
    for mode in ("fwd", "fwd+bwd"):
      top = best.get(case.name, {}).get(mode)
      first = next((r for r in rows if r.case == case.name and r.mode == mode), None)
      if top is None:
        print(f"best {case.name:<20} {mode:<8} none timed")
        continue
      gain = f", {first.ms / top['ms']:.2f}x vs the default" if first and first.ms else ""
      print(f"best {case.name:<20} {mode:<8} {top['config']:<30} {top['ms']:.3f} ms  "
            f"{top['tflops']:.1f} TFLOP/s  x{fmt(top['x_cudnn'], '.2f')} {base['name']}{gain}")
    if "kwargs" in best.get(case.name, {}):
      print(f"  kwargs: {best[case.name]['kwargs']}")
  meta = {"device": device.device_kind, "platform": platform, "jax": jax.__version__,
          "shape": shape, "interpret": interpret, "baseline": base,
          "flops_fwd": flops, "args": vars(args)}
  write_results(args.out, "tune_flash_pallas_gpu.json", meta, rows, best)
  return 1 if any(r.status == "MISMATCH" for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
