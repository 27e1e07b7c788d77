"""The Pallas GPU flash kernel, segments x4 + sinks (b4 s4096 n32 k8 h128 bf16, causal), timed
through whatever `meshattn` is importable, so one call can A/B commits (docs/benchmarks.md,
2026-12-05): put a snapshot's package first on PYTHONPATH per process.

    python scripts/ab_segments_sinks.py LABEL [nohide]   # nohide: without the NaN selects
"""
import statistics, sys, time
import jax, jax.numpy as jnp
import meshattn
from meshattn.layers.kernels import registry
try:
  from meshattn.layers.kernels.api import KernelOptions
except ImportError:
  from meshattn.layers.kernels.dot_product import KernelOptions
from meshattn.layers.masks import MaskSpec

def main():
  label = sys.argv[1]
  if "nohide" in sys.argv:
    from meshattn.layers.kernels.train import flash_pallas_gpu as fpg
    fpg.hide = lambda x, live: x
  B, S, N, K, H, DOCS = 4, 4096, 32, 8, 128, 4
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, S, N, H), jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, S, K, H), jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, S, K, H), jnp.bfloat16)
  cot = jax.random.normal(keys[3], (B, S, N, H), jnp.float32)
  sinks = jax.random.normal(keys[4], (N,), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  seg = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32) * DOCS // S + 1, (B, S))


  def run_for(backward):
    feats = {"causal", "gqa", "segment_ids", "sinks"} | ({"backward"} if backward else set())
    chosen = registry.select("flash", registry.Request("gpu", "train", frozenset(feats)))
    kernel = chosen.load()
    def run(q, k, v):
      options = KernelOptions(mask=MaskSpec("global"), scale=H ** -0.5)
      return kernel(q, k, v, options=options, q_positions=pos, kv_positions=pos,
                    q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks)[0]
    return chosen.description, run


  def timed(fn, *args, iters=20, samples=7):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(samples):
      t = time.perf_counter()
      for _ in range(iters):
        r = fn(*args)
      jax.block_until_ready(r)
      out.append((time.perf_counter() - t) / iters * 1e3)
    return statistics.median(out)


  desc, fwd = run_for(False)
  _, bwd_run = run_for(True)
  f = jax.jit(fwd)
  g = jax.jit(jax.grad(lambda q, k, v: (bwd_run(q, k, v).astype(jnp.float32) * cot).sum(),
                       argnums=(0, 1, 2)))
  print(f"{label:28s} {desc:24s} fwd {timed(f, q, k, v):.3f} ms  fwd+bwd {timed(g, q, k, v):.3f} ms"
        f"  ({meshattn.__file__})", flush=True)


if __name__ == "__main__":
  main()
