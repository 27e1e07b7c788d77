"""Serve a trained checkpoint with continuous batching, plain and quantized, side by side.

    python scripts/serve.py CHECKPOINT [key=value ...] [--requests 64 --rate 40 --slots 8 ...]
    python scripts/serve.py runs/tiny-lm/checkpoints ici_tensor_parallelism=2 --variants base,int8_kv

CHECKPOINT is a `checkpoint_dir` written by scripts/train.py (config.yml +
Orbax steps). `key=value` overrides go to its config: the mesh of this run
(`ici_*_parallelism`, any device count), kernels, `dtype`,
`quantization=int8` (AQT projections), `quantize_kvcache=true
kv_quant_dtype=int8|int4`, `tokens_per_page`. The parameters are restored
onto this mesh (scripts/checkpointing.restore_params).

A trace of recall prompts from the training task (held-out stream) arrives
as a Poisson process of `--rate` requests per second (inf = all at once);
each prompt ends at a query, and the answer is the first output token. The
engine (layers/engine.py) serves it: slots, pages, chunked prefill mixed
with decode steps, greedy sampling (or `--temperature T [--top-k K --top-p P]`,
every request with its own reproducible stream), up to `--new-tokens` tokens per
request (a fixed count, or LOW:HIGH drawn per request by the trace).
Each variant (`--variants`, default base,int8_kv,int4_kv,int8_proj) is the
checkpoint restored with its overrides on top of yours and the same trace
replayed. Printed: one table of throughput, time to first token and time per
output token (p50 / p90), cache pages and recall accuracy per variant.
Written to --out: serve.json (summaries, per-request and per-step records)
and serve_<variant>.png (batch occupancy and pages in use over time).

Several processes: `python scripts/launch_local.py -n 2 --cpu-devices 4 --
scripts/serve.py CHECKPOINT ...` (or any launcher that sets the MESHATTN_*
variables): every process restores its part of the parameters and runs the same
engine loop (docs/serving.md), the data axis spans the processes
(`dcn_data_parallelism` = their count unless a `dcn_*` key is given), and process 0
prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import numpy as np

from meshattn.layers.engine import Engine, SamplingParams, plot_timeline
from meshattn.layers.engine_trace import poisson_trace
from meshattn.scripts.checkpointing import load_checkpoint_config, restore_params
from meshattn.scripts.serve_trace import recall_prompts
from meshattn.sharding import create_mesh, initialize_from_env, mesh_shape_string

# name -> (label, config overrides on top of the user's)
VARIANTS = {
    "base": ("{dtype}", ()),
    "int8_kv": ("int8 KV", ("quantize_kvcache=true", "kv_quant_dtype=int8")),
    "int4_kv": ("int4 KV", ("quantize_kvcache=true", "kv_quant_dtype=int4")),
    "int8_proj": ("int8 projections", ("quantization=int8",)),
}


def _token_range(text: str) -> tuple[int, int]:
  """'N' or 'LOW:HIGH' (inclusive) -> (low, high), both >= 1."""
  try:
    low, _, high = text.partition(":")
    bounds = (int(low), int(high or low))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--new-tokens {text!r}: give N or LOW:HIGH") from None
  if not 1 <= bounds[0] <= bounds[1]:
    raise argparse.ArgumentTypeError(f"--new-tokens {text!r}: need 1 <= LOW <= HIGH")
  return bounds


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("checkpoint", help="checkpoint_dir written by scripts/train.py")
  p.add_argument("overrides", nargs="*", help="key=value config overrides (mesh, kernels, ...)")
  p.add_argument("--requests", type=int, default=64, help="requests in the trace")
  p.add_argument("--rate", type=float, default=40.0, help="arrivals per second (inf: all at once)")
  p.add_argument("--new-tokens", type=_token_range, default=(8, 8),
                 help="max output tokens per request: N, or LOW:HIGH drawn per request")
  p.add_argument("--end-token", type=int, default=None,
                 help="stop a request when it generates this token id (default: length only)")
  p.add_argument("--slots", type=int, default=8, help="cache slots (batch of the decode rows)")
  p.add_argument("--chunk", type=int, default=16, help="prefill chunk length")
  p.add_argument("--prefill-rows", type=int, default=1, help="prefill chunks per step")
  p.add_argument("--single-kind", action="store_true",
                 help="compile one step kind (mixed) instead of three: faster start, each "
                      "step pays for both parts' shapes (short CPU runs)")
  p.add_argument("--pages", type=int, default=0,
                 help="cache pages per layer (0: every slot can hold a whole sequence)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated, from {list(VARIANTS)}")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--seed", type=int, default=0, help="trace seed (prompts, arrivals, lengths)")
  p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
  p.add_argument("--out", default="runs/serve", help="folder for serve.json and the plots")
  args = p.parse_args(argv)
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {unknown}; allowed {list(VARIANTS)}")
  bad = [o for o in args.overrides if "=" not in o]
  if bad:
    p.error(f"overrides must be key=value, got {bad}")
  try:  # each request's seed is its id (Engine.submit)
    args.sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    p.error(f"--temperature / --top-k / --top-p: {e}")
  return args


def serve_variant(args, name: str, trace, answers: dict[int, int], max_length: int) -> dict:
  """Restore the checkpoint with this variant's overrides, replay the trace, measure."""
  base_cfg = load_checkpoint_config(args.checkpoint, *args.overrides)
  tpp = base_cfg.tokens_per_page
  pages = args.pages or args.slots * math.ceil(max_length / tpp)
  label, extra = VARIANTS[name]
  cfg = load_checkpoint_config(args.checkpoint, *args.overrides, *extra, "paged_kv_cache=true",
                               f"num_pages={pages}")
  mesh = create_mesh(cfg)
  model = restore_params(args.checkpoint, cfg, mesh, step=args.step)
  engine = Engine(model, num_slots=args.slots, chunk_size=args.chunk,
                  prefill_rows=args.prefill_rows, max_length=max_length,
                  end_token=args.end_token, specialize=not args.single_kind)
  started = time.perf_counter()
  engine.warmup(sampling=not args.sampling.greedy)
  compile_s = time.perf_counter() - started
  results = engine.run(trace, realtime=math.isfinite(args.rate))
  correct = [results[rid].tokens[0] == answer for rid, answer in answers.items()]
  summary = dict(engine.summary(), variant=name, label=label.format(dtype=cfg.dtype),
                 recall_accuracy=float(np.mean(correct)), compile_s=compile_s,
                 mesh=mesh_shape_string(mesh), num_pages=pages, tokens_per_page=tpp)
  out = pathlib.Path(args.out)
  if jax.process_index() == 0:
    plot_timeline(engine.steps, str(out / f"serve_{name}.png"), num_slots=args.slots,
                  num_pages=pages, title=f"{summary['label']}: {len(trace)} requests, "
                  f"{args.slots} slots, chunk {args.chunk}")
  return {"summary": summary,
          "requests": [dict(id=r.id, arrival=r.arrival, prompt_length=len(r.prompt),
                            tokens=r.tokens, ttft=r.ttft, tpot=r.tpot,
                            finish_reason=r.finish_reason)
                       for r in results.values()],
          "steps": [dataclasses.asdict(s) for s in engine.steps]}


def print_table(summaries: list[dict]) -> None:
  header = ["variant", "tokens/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms",
            "max pages reserved", "mixed steps", "recall acc"]
  rows = [[s["label"], f"{s['tokens_per_s']:.1f}", f"{1e3 * s['ttft_p50_s']:.1f}",
           f"{1e3 * s['ttft_p90_s']:.1f}", f"{1e3 * s['tpot_p50_s']:.1f}",
           f"{1e3 * s['tpot_p90_s']:.1f}", f"{s['max_pages_reserved']}/{s['num_pages']}",
           f"{s['mixed_steps']}/{s['steps']}", f"{100 * s['recall_accuracy']:.1f}%"]
          for s in summaries]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  for row in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  initialize_from_env()  # under scripts/launch_local.py: join the other processes first
  if jax.process_count() > 1 and not any(o.startswith("dcn_") for o in args.overrides):
    args.overrides = ["dcn_data_parallelism=-1", *args.overrides]  # one slice per process
  lead = jax.process_index() == 0  # every process serves; the first one reports
  out = pathlib.Path(args.out)
  if lead:
    out.mkdir(parents=True, exist_ok=True)
  cfg = load_checkpoint_config(args.checkpoint, *args.overrides)
  prompts, answers = recall_prompts(cfg, args.requests, seed=args.seed)
  trace = poisson_trace(prompts, rate=args.rate, max_new_tokens=args.new_tokens, seed=args.seed)
  trace = [dataclasses.replace(r, sampling=args.sampling) for r in trace]
  max_length = max(len(p) for p in prompts) + args.new_tokens[1] - 1  # the longest a request grows
  runs = {}
  for name in args.variants.split(","):
    if lead:
      print(f"[serve] {name}: restoring {args.checkpoint} and replaying {len(trace)} requests",
            flush=True)
    runs[name] = serve_variant(args, name, trace, dict(enumerate(answers)), max_length)
  if not lead:
    return 0
  summaries = [r["summary"] for r in runs.values()]
  print(f"\nserving {args.checkpoint}: {len(trace)} requests at {args.rate}/s, "
        f"{args.slots} slots, chunk {args.chunk} x {args.prefill_rows}, "
        f"{summaries[0]['mesh']}, {jax.devices()[0].platform}")
  print_table(summaries)
  settings = {k: v for k, v in vars(args).items() if k != "sampling"}  # its fields are there
  (out / "serve.json").write_text(json.dumps({"args": settings, "runs": runs}, indent=1))
  print(f"\nwrote {out / 'serve.json'} and {', '.join(str(out / f'serve_{n}.png') for n in runs)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
