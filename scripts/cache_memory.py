"""Print the memory of each KV-cache kind per layer: bytes per cached token,
with and without int8 / int4 quantization, measured from the caches' own
arrays (built abstractly with nnx.eval_shape, so nothing is allocated).

    python scripts/cache_memory.py [preset ...]      # default: llama3-8b mistral-7b

Every preset is sized at max_target_length = 32768 tokens.

int4 is counted at 4 bits per value (packed, as on TPU/GPU); JAX on CPU
stores int4 in a byte.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
from flax import nnx

from meshattn.configs import load_config
from meshattn.kvcache import KVCache, KVQuant, PagedKVCache

BATCH = 8
MAX_LENGTH = 32768  # every preset at the same context, so the kinds compare
QUANTS = [("bf16", None), ("int8 per token+head", KVQuant("int8", "dkv")),
          ("int8 per token", KVQuant("int8", "heads_and_dkv")), ("int4 per token+head", KVQuant("int4", "dkv"))]


def state_bytes(module) -> float:
  """Bytes of every cache array, int4 at half a byte; page tables and lengths included."""
  total = 0.0
  for leaf in nnx.to_flat_state(nnx.state(module)):
    value = leaf[1].get_value()
    bits = 4 if value.dtype == jnp.int4 else 8 * value.dtype.itemsize
    total += value.size * bits / 8
  return total


def rows_for(preset: str) -> list[list[str]]:
  cfg = load_config(preset, f"max_target_length={MAX_LENGTH}", "max_prefill_predict_length=1024")
  k, h, max_len = cfg.num_kv_heads, cfg.head_dim, cfg.max_target_length
  window = cfg.sliding_window_size if "local_sliding" in (cfg.attention_type, *cfg.attention_layer_pattern) else 0
  kinds = [("contiguous", lambda q: KVCache(BATCH, max_len, k, h, dtype=jnp.bfloat16, quant=q), max_len)]
  if window:
    kinds.append((f"ring (window {window})",
                  lambda q: KVCache(BATCH, max_len, k, h, dtype=jnp.bfloat16, quant=q, window=window),
                  min(window, max_len)))
  pages = BATCH * max_len // 16
  kinds.append((f"paged ({pages} x 16-token pages)",
                lambda q: PagedKVCache(BATCH, max_len, k, h, num_pages=pages, tokens_per_page=16,
                                       dtype=jnp.bfloat16, quant=q), max_len))
  rows = []
  for kind, make, tokens_per_slot in kinds:
    for label, quant in QUANTS:
      cache = nnx.eval_shape(lambda: make(quant))
      total = state_bytes(cache)
      rows.append([preset, f"K={k} H={h}", kind, label, f"{total / (BATCH * tokens_per_slot):.1f}",
                   f"{total / BATCH / 2**20:.2f}"])
  return rows


def main(argv: list[str]) -> int:
  presets = argv or ["llama3-8b", "mistral-7b"]
  header = ["preset", "kv shape", "cache", "storage", "bytes/token/layer", f"MiB/sequence/layer @{MAX_LENGTH}"]
  rows = [r for p in presets for r in rows_for(p)]
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  print(f"KV cache memory per layer (batch {BATCH}; per-token bytes include scales and tables)")
  for r in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
