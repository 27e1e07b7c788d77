"""Quantized-KV error over many draws: the table behind docs/quantization.md's bounds.

    python scripts/kv_quant_error.py --draws 64

Each draw is a fresh layer (emb 64, 4 query / 2 kv heads, head_dim 32) and fresh inputs
with one feature x20 (an outlier channel); a 6-token prefill and 4 decode steps through a
quantized cache against the train forward. Prints, per dtype, the median / 95th percentile
/ worst of the RMS ratio and of the max ratio (tests/layers/test_quant_outliers.py checks
the stated bounds on 8 draws).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention

PROMPT, TOTAL, EMB = 6, 10, 64


def _serve(model: Attention, x: jax.Array) -> jax.Array:
  model.init_cache(x.shape[0], TOTAL)
  outs = [model(x[:, :PROMPT], model_mode="prefill")]
  outs += [model(x[:, t:t + 1], model_mode="autoregressive") for t in range(PROMPT, TOTAL)]
  return jnp.concatenate(outs, axis=1)  # [B, TOTAL, EMB]


def errors(dtype: str, seed: int, axis: str) -> tuple[float, float]:
  """(RMS error / RMS reference, max error / max |reference|) of one draw."""
  model = Attention(emb_dim=EMB, num_query_heads=4, num_kv_heads=2, head_dim=32,
                    kv_quant=KVQuant(dtype, axis), decode_attention="dot_product",
                    rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed), (2, TOTAL, EMB)).at[..., 5].multiply(20.0)
  got = np.asarray(_serve(model, x), np.float64)
  want = np.asarray(model(x), np.float64)
  rms = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
  return float(rms), float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--draws", type=int, default=64)
  parser.add_argument("--axis", default="dkv", choices=["dkv", "heads_and_dkv"])
  args = parser.parse_args()
  print(f"| dtype | measure | median | 95th pct | worst |  ({args.draws} draws, {args.axis})")
  print("|---|---|---|---|---|")
  for dtype in ("int8", "int4"):
    table = np.array([errors(dtype, seed, args.axis) for seed in range(args.draws)])  # [draws, 2]
    for column, name in enumerate(("RMS / RMS", "max / max")):
      e = table[:, column]
      print(f"| {dtype} | {name} | {np.median(e):.4f} | {np.quantile(e, 0.95):.4f} | "
            f"{e.max():.4f} |")


if __name__ == "__main__":
  main()
