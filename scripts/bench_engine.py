"""The engine's mixed step costs what its tokens cost (issue 17): a table of the
decode-only, chunk-only and mixed steps and the ratio mixed / (decode + chunk).

    python scripts/bench_engine.py                        # GPU: lm-1b, 64 slots, 512-token chunk
    python scripts/bench_engine.py tiny-lm --slots 4 --chunk 8 --context 8 --iters 3   # CPU smoke
    python scripts/bench_engine.py lm-1b dtype=bfloat16 quantize_kvcache=true --json out.json

The model is a randomly initialised Decoder of the given preset (timings do
not depend on the weights). Slots 0..S-2 are prefilled with `context` tokens
and decode; slot S-1 holds `context` tokens and takes one chunk of `chunk`
tokens. Each kind runs through the engine's own compiled step
(layers/engine_step.py):

  decode  S-1 decode rows (the chunk rows gated off: the decode-only variant)
  chunk   one chunk row continuing slot S-1 (the chunk-only variant)
  mixed   both in one step

Each step is timed from dispatch to its tokens on the host (what the engine
loop pays), the median of `iters` steps after one warm-up. Before each chunk
or mixed step slot S-1 is cut back to `context` tokens (untimed: freed and
prefilled again), so every chunk continues the same context. The issue's
target on the GPU: mixed <= 1.2 x (decode + chunk).

With `--trace N` it then serves N requests (random prompts of `context`
tokens, `--new-tokens` outputs, all arriving at once) through the whole
Engine loop (layers/engine.py: scheduler, page tables, steps, sampling on
the host) and prints its throughput, the decode-only steps' tokens/s and
ms per step (the loop's per-step cost, host included), TTFT and TPOT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import numpy as np
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine
from meshattn.layers.engine_schedule import Chunk, Request, StepPlan
from meshattn.layers.engine_step import make_engine_step, run_step, step_inputs
from meshattn.sharding import create_mesh, shard_module


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", nargs="?", default="lm-1b", help="preset name or YAML path")
  p.add_argument("overrides", nargs="*", help="key=value config overrides")
  p.add_argument("--slots", type=int, default=64, help="S: cache slots (S-1 decode rows)")
  p.add_argument("--chunk", type=int, default=512, help="C: prefill chunk length")
  p.add_argument("--context", type=int, default=512, help="tokens already in every slot")
  p.add_argument("--iters", type=int, default=10, help="timed steps per kind")
  p.add_argument("--trace", type=int, default=0,
                 help="then serve this many requests (prompt `context` tokens, all at once) "
                      "through the Engine and report its loop's throughput, TTFT and TPOT")
  p.add_argument("--new-tokens", type=int, default=64, help="output tokens per --trace request")
  p.add_argument("--no-overlap", action="store_true",
                 help="--trace: read each step's tokens before dispatching the next")
  p.add_argument("--json", help="write the table as JSON here")
  return p.parse_args(argv)


class Bench:
  """A Decoder with a paged cache sized for the run, and the engine's step."""

  def __init__(self, args):
    self.slots, self.chunk, self.context, self.iters = args.slots, args.chunk, args.context, args.iters
    if self.slots < 2:
      raise ValueError("--slots must be >= 2 (S-1 decode rows and one chunk slot)")
    base = load_config(args.config, *args.overrides)
    tpp = base.tokens_per_page
    growth = max(3 * self.iters + 4, args.new_tokens if args.trace else 0)
    max_length = self.context + max(self.chunk, growth)
    decode_pages = self.slots * math.ceil((self.context + growth) / tpp)
    pages = decode_pages + math.ceil(max_length / tpp) + 1
    sizes = [f"max_target_length={max_length}"] if max_length > base.max_target_length else []
    prefill = max(self.chunk, self.context, base.max_prefill_predict_length)
    self.cfg = load_config(args.config, *args.overrides, *sizes, "paged_kv_cache=true",
                           f"num_pages={pages}", f"max_prefill_predict_length={prefill}")
    mesh = create_mesh(self.cfg)
    self.model = Decoder(self.cfg, mesh=mesh, rngs=nnx.Rngs(0))
    shard_module(self.model, mesh, self.model.rules)
    self.caches = self.model.init_cache(self.slots, max_length, paged=True)
    self.step = make_engine_step()
    self.rng = np.random.default_rng(0)
    self.lengths = np.zeros(self.slots, np.int64)
    self.chunk_slot = self.slots - 1

  def _reserve(self, slots, tokens):
    for cache in self.caches:
      cache.reserve_for_step(np.asarray(slots, np.int32), np.asarray(tokens))

  def _run(self, plan: StepPlan, rows: int, width: int, kind: str) -> float:
    after = plan.lengths_after
    if after:  # pages for the step's tokens (the engine reserves a request's at admission)
      self._reserve(list(after), [after[s] - self.lengths[s] for s in after])
    inputs = step_inputs(plan, self.slots, rows, width)
    start = time.perf_counter()
    out = run_step(self.step, self.model, inputs, kind)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    for slot, total in plan.lengths_after.items():
      self.lengths[slot] = total
    return seconds

  def _tokens(self, n):
    return self.rng.integers(1, self.cfg.vocab_size, n).astype(np.int32)

  def _prefill(self, slot):
    """Fill `slot` with `context` tokens, chunk by chunk (untimed)."""
    for start in range(0, self.context, self.chunk):
      n = min(self.chunk, self.context - start)
      c = Chunk(slot, start, self._tokens(n), False)
      self._run(StepPlan((), (), (), (c,), {slot: start + n}), 1, self.chunk, "chunk")

  def _plan(self, decode: bool, chunk: bool) -> StepPlan:
    slots = tuple(range(self.slots - 1)) if decode else ()
    chunks = (Chunk(self.chunk_slot, self.context, self._tokens(self.chunk), True),) if chunk else ()
    after = {s: int(self.lengths[s]) + 1 for s in slots}
    after.update({c.slot: self.context + self.chunk for c in chunks})
    return StepPlan(slots, tuple(int(t) for t in self._tokens(len(slots))),
                    tuple(int(self.lengths[s]) for s in slots), chunks, after)

  def _reset_chunk_slot(self):
    for cache in self.caches:
      cache.free(self.chunk_slot)
    self.lengths[self.chunk_slot] = 0
    self._prefill(self.chunk_slot)

  def measure(self) -> dict[str, float]:
    for slot in range(self.slots):
      self._prefill(slot)
    times = {}
    for kind, decode, chunk in (("decode", True, False), ("chunk", False, True),
                                ("mixed", True, True)):
      samples = []
      for i in range(self.iters + 1):  # the first is the compile / warm-up
        if chunk:
          self._reset_chunk_slot()
        seconds = self._run(self._plan(decode, chunk), 1, self.chunk, kind)
        if i:
          samples.append(seconds)
      times[kind] = float(np.median(samples)) * 1e3
    return times


def serve_trace(bench: Bench, args) -> dict:
  """The whole engine loop (scheduler, pages, steps, sampling) on `args.trace` requests."""
  engine = Engine(bench.model, num_slots=bench.slots, chunk_size=bench.chunk,
                  max_length=bench.context + args.new_tokens, overlap=not args.no_overlap)
  engine.warmup()
  rng = np.random.default_rng(1)
  trace = [Request(i, rng.integers(1, bench.cfg.vocab_size, bench.context).astype(np.int32),
                   args.new_tokens) for i in range(args.trace)]
  engine.run(trace, realtime=False)
  return engine.summary()


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  bench = Bench(args)
  ms = bench.measure()
  s, c = bench.slots, bench.chunk
  rows = [("decode", f"{s - 1} rows x 1", s - 1, ms["decode"]),
          ("chunk", f"1 row x {c}", c, ms["chunk"]),
          ("mixed", f"{s - 1} rows x 1 + 1 x {c}", s - 1 + c, ms["mixed"])]
  ratio = ms["mixed"] / (ms["decode"] + ms["chunk"])
  cfg = bench.cfg
  print(f"\nengine step, {args.config}: {cfg.num_decoder_layers} layers, emb {cfg.emb_dim}, "
        f"{cfg.dtype}, context {bench.context}, {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}")
  print(f"{'step':<8}{'rows':<26}{'tokens':>8}{'ms':>10}")
  for name, shape, tokens, t in rows:
    print(f"{name:<8}{shape:<26}{tokens:>8}{t:>10.3f}")
  print(f"mixed / (decode + chunk) = {ratio:.3f}   (issue 17 target on GPU: <= 1.2)")
  result = {"config": args.config, "overrides": args.overrides, "slots": s, "chunk": c,
            "context": bench.context, "ms": ms, "ratio": ratio,
            "device": jax.devices()[0].device_kind}
  if args.trace:
    summary = result["trace"] = serve_trace(bench, args)
    print(f"\nengine loop: {args.trace} requests of {bench.context} prompt + {args.new_tokens} "
          f"output tokens, all at once, {s} slots, chunk {c}, overlap {not args.no_overlap}")
    print(f"output tokens/s {summary['tokens_per_s']:.0f}   decode-only steps: "
          f"{summary['decode_tokens_per_s']:.0f} tokens/s, {1e3 * summary['decode_step_s']:.2f} ms "
          f"per step   TTFT p50 / p90 {1e3 * summary['ttft_p50_s']:.1f} / "
          f"{1e3 * summary['ttft_p90_s']:.1f} ms   TPOT p50 / p90 "
          f"{1e3 * summary['tpot_p50_s']:.2f} / {1e3 * summary['tpot_p90_s']:.2f} ms   "
          f"steps {summary['steps']} ({summary['mixed_steps']} mixed)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
