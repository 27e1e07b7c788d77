"""Host time of one serving step on the CPU: the tiny preset's decode step per call.

    python scripts/bench_step_overhead.py [--batch 4 --capacity 320 --calls 100]

The tiny preset's device work is a few microseconds, so a call's time is
mostly the wrapper's Python and JAX's dispatch. Rows: `jit_step` with and
without the per-step rejection check, `nnx.jit` with donation (what
`jit_step` replaces), and a bare `jax.jit` of one add (JAX's own dispatch
floor), each the mean of --calls calls dispatched back to back (issue 20:
"the step's Python/dispatch overhead for the tiny preset, before and after").
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step


def per_call_us(fn, *args, calls: int) -> float:
  for _ in range(5):  # compile + warm-up
    out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> list[tuple[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--capacity", type=int, default=320)
  parser.add_argument("--calls", type=int, default=100)
  args = parser.parse_args(argv)
  attn = Attention(load_config("tiny"), rngs=nnx.Rngs(0))
  attn.init_cache(args.batch, args.capacity)
  d = attn.settings.emb_dim
  jit_step(lambda m, x: m(x, model_mode="prefill"))(attn, jnp.ones((args.batch, 4, d)))
  x = jnp.ones((args.batch, 1, d))  # [B, 1, D]
  decode = lambda m, x: m(x, model_mode="autoregressive")
  needed = 4 + 3 * (5 + args.calls)  # the prompt + one token per call of each cached row
  if needed > args.capacity:
    raise SystemExit(f"--capacity {args.capacity} < the {needed} tokens the calls append")
  add = jax.jit(lambda a: a + 1)
  rows = [("jit_step (check=True)", per_call_us(jit_step(decode), attn, x, calls=args.calls)),
          ("jit_step, check=False", per_call_us(jit_step(decode, check=False), attn, x,
                                                calls=args.calls)),
          ("nnx.jit (donated)", per_call_us(nnx.jit(decode, donate_argnums=0), attn, x,
                                            calls=args.calls)),
          ("bare jax.jit (a + 1)", per_call_us(add, jnp.ones(3), calls=args.calls))]
  print(f"tiny preset decode step, batch {args.batch}, cache {args.capacity}, "
        f"{jax.default_backend()}, jax {jax.__version__}")
  for what, us in rows:
    print(f"{what:26} {us:9.1f} us per call")
  return rows


if __name__ == "__main__":
  main()
