"""Where a serving step's time goes: XLA's cost analysis and a profiler trace.

    python scripts/profile_layer_step.py --out DIR [--decode 64x4096] [--caches contiguous paged]
        [--prefill 8x4096x512]

For the decode step (one call, and 16 steps in one `lax.scan`) of each cache
kind, the fresh prefill, the `reset` that empties its slots (one call per slot,
and one call for all) and the chunked prefill of scripts/bench_layer.py (Llama
3 8B attention, bf16): prints the host time per call (dispatched back to back,
untraced), the device time per call and the costliest kernels (from a
`jax.profiler` trace written under DIR). A step whose host time per call is
above its device time makes the device wait.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import time

import jax
import numpy as np

from meshattn.layers.serving import jit_step
from meshattn.scripts.bench_layer import SCAN_STEPS, build, fill, scan_steps, set_lengths


def top_kernels(trace_dir: pathlib.Path, count: int = 10) -> list[tuple[str, float, int]]:
  """(name, total us, calls) of the longest device events in the newest trace."""
  files = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True))
  if not files:
    return []
  events = json.loads(gzip.open(files[-1]).read())["traceEvents"]
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in str(e.get("args", {}).get("name", ""))}
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      total[e["name"]] += e.get("dur", 0)
      calls[e["name"]] += 1
  return [(name, us, calls[name]) for name, us in total.most_common(count)]


def host_ms(fn, args, reset=None, calls: int = 50) -> float:
  """Host time per call (ms): `calls` calls (each after `reset`) dispatched back to back,
  timed until the last returns, not until it is done. Below the device time per call, the
  device never waits for the host."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    if reset:
      reset()
    y = fn(*args)
  elapsed = time.perf_counter() - start
  jax.block_until_ready(y)
  return elapsed * 1e3 / calls


def profile(name: str, fn, args, out: pathlib.Path, reset=None, runs: int = 5,
            count: int = 10, host_calls: int = 50) -> None:
  """Prints the host time per call, then the costliest device kernels per call (their
  total: the device time) from a trace of `runs` calls."""
  host = host_ms(fn, args, reset, calls=host_calls)
  if reset:
    reset()
  jax.block_until_ready(fn(*args))
  trace_dir = out / name
  jax.profiler.start_trace(str(trace_dir))
  start = time.perf_counter()
  for _ in range(runs):
    if reset:
      reset()
    y = fn(*args)
  jax.block_until_ready(y)
  wall_ms = (time.perf_counter() - start) * 1e3 / runs
  jax.profiler.stop_trace()
  kernels = top_kernels(trace_dir, 10 ** 6)
  device_ms = sum(us for _, us, _ in kernels) / runs / 1e3
  launches = sum(calls for _, _, calls in kernels) / runs
  print(f"\n## {name}: host {host:.3f} ms per call untraced; device kernels {device_ms:.3f} ms "
        f"({launches:.0f} kernels) per run over {runs} runs (wall {wall_ms:.3f} ms per run while "
        "tracing); the costliest, us per run:")
  for kernel, us, calls in kernels[:count]:
    print(f"{us / runs:10.1f}  x{calls // runs:<3} {kernel[:110]}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="profile_out")
  parser.add_argument("--decode", default="64x4096")
  parser.add_argument("--caches", nargs="*", default=["contiguous"])
  parser.add_argument("--prefill", default="8x4096x512")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  b, kv = (int(n) for n in args.decode.split("x"))
  for kind in args.caches:
    attn = build({}, kind, b, kv + 8 * SCAN_STEPS, 64)
    fill(attn, kv)
    if kind == "paged":
      attn.cache.reserve_for_step(np.arange(b), 8 * SCAN_STEPS)
    x = jax.random.normal(jax.random.key(0), (b, 1, attn.settings.emb_dim), attn.settings.dtype)
    step = jit_step(lambda m, x: m(x, model_mode="autoregressive"), check=False)
    profile(f"decode_{kind}_b{b}_kv{kv}", step, (attn, x), out, reset=lambda: set_lengths(attn, kv),
            count=25)
    set_lengths(attn, kv)
    _, _, state, run = scan_steps(attn)
    holder = {"state": state}

    def scanned(xs):
      holder["state"], ys = run(holder["state"], xs)
      return ys

    xs = jax.numpy.broadcast_to(x, (SCAN_STEPS,) + x.shape)
    profile(f"scan_{kind}_b{b}_kv{kv} (x{SCAN_STEPS} steps per run)", scanned, (xs,), out,
            runs=2, count=25, host_calls=2)  # the cache has room for 8 x 16 steps
  b, p, c = (int(n) for n in args.prefill.split("x"))
  attn = build({}, "contiguous", b, p, 16)
  x = jax.random.normal(jax.random.key(1), (b, p, attn.settings.emb_dim), attn.settings.dtype)
  prefill = jit_step(lambda m, x: m(x, model_mode="prefill"), check=False)
  profile(f"fresh_prefill_b{b}_s{p}", prefill, (attn, x), out, reset=lambda: set_lengths(attn, 0))
  single = lambda: [attn.cache.reset(slot) for slot in range(b)][-1] or attn.cache.lengths[...]
  profile(f"reset_{b}_slots_one_call_each", single, (), out)
  batched = lambda: attn.cache.reset(np.arange(b)) or attn.cache.lengths[...]
  profile(f"reset_{b}_slots_in_one_call", batched, (), out)
  profile(f"chunk_b{b}_{c}_over_{p - c}", prefill, (attn, x[:, :c]), out,
          reset=lambda: set_lengths(attn, p - c))
  train = jit_step(lambda m, x: m(x, model_mode="train"), check=False, donate=False)
  profile(f"train_b{b}_s{p}", train, (attn, x), out)


if __name__ == "__main__":
  main()
