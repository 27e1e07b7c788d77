"""GPU check: the layer's int8-cache decode steps against its train forward, and which kernel ran.

    JAX_PLATFORMS=cuda,cpu python scripts/check_int8_decode_layer.py

For MHA, GQA and MQA (8 query heads, head_dim 128) and the `ragged` and
`autoselected` decode kernels: prefill 100 tokens into an int8 cache of
capacity 256, decode 8 more one at a time, and compare those steps with the
train-mode forward over the same 108 tokens (bound: 2e-2 of max |ref|, the
int8 cache's bound in tests/layers/test_modes.py). Also counts the calls
traced into the Hopper Mosaic int8 kernel (decode_int8_mgpu): where it is
routed (`measured_faster_here`) every configuration must reach it. Exits non-zero on a failed check.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention
from meshattn.layers.kernels.decode import decode_int8_mgpu

EMB, PROMPT, TOTAL, CAPACITY, BATCH = 512, 100, 108, 256, 3
BOUND = 2e-2


def main() -> int:
  traced = []
  kernel = decode_int8_mgpu.int8_decode_mgpu

  def counting(*args, **kwargs):
    traced.append(1)
    return kernel(*args, **kwargs)

  decode_int8_mgpu.int8_decode_mgpu = counting  # decode.ragged_decode calls it through the module
  run = nnx.jit(lambda m, x, mode: m(x, model_mode=mode), static_argnames="mode")
  train = nnx.jit(lambda m, x: m(x, model_mode="train"))
  failures = 0
  for kv_heads, decode_kernel in itertools.product((8, 2, 1), ("ragged", "autoselected")):
    before = len(traced)
    model = Attention(rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=8, num_kv_heads=kv_heads,
                      head_dim=128, kv_quant=KVQuant("int8"), dtype=jnp.bfloat16,
                      decode_attention=decode_kernel)
    x = jax.random.normal(jax.random.key(1), (BATCH, TOTAL, EMB), jnp.bfloat16)  # [B, T, D]
    want = train(model, x).astype(jnp.float32)  # [B, T, D]
    model.init_cache(BATCH, CAPACITY)
    run(model, x[:, :PROMPT], "prefill")
    steps = [run(model, x[:, t:t + 1], "autoregressive") for t in range(PROMPT, TOTAL)]
    got = jnp.concatenate(steps, axis=1).astype(jnp.float32)  # [B, T - P, D]
    err = float(jnp.max(jnp.abs(got - want[:, PROMPT:])) / jnp.max(jnp.abs(want)))
    routed = len(traced) > before
    ok = err < BOUND and (routed or not decode_int8_mgpu.measured_faster_here())
    failures += not ok
    print(f"{decode_kernel:12s} kv_heads {kv_heads}: max rel err {err:.2e} (bound {BOUND}); "
          f"Mosaic int8 kernel {'used' if routed else 'not used'}  {'ok' if ok else 'FAILED'}",
          flush=True)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, routed here: "
        f"{decode_int8_mgpu.measured_faster_here()}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
