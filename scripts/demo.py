"""meshattn demo: the user's whole job on this machine's CPU, from YAML.

    make demo                                   # tiny-lm, about 2-3 minutes from a fresh clone
    make demo ARGS="tiny-lm learning_rate=2e-3"  # a preset or .yml first, then key=value overrides
    python scripts/demo.py [CONFIG] [key=value ...] [--out runs/demo]

1. Train: scripts/train.py on CONFIG (default `tiny-lm`) as 2 processes x 4 CPU
   devices through scripts/launch_local.py, multi-query associative recall until
   the held-out accuracy reaches --target (or the config's `steps`), with
   Orbax checkpoints.
2. Serve: scripts/serve.py restores the checkpoint onto another mesh (one
   process, 8 devices, tensor-parallel 2) and replays a trace of recall
   prompts through the continuous-batching engine: bf16-or-float32, int8 KV,
   int4 KV and int8 projections side by side.
3. Print the summary: training steps, time, accuracy; the serving table; where
   the logs and plots are.

The overrides go to training (the checkpoint keeps the resolved config, which
serving restores). `make check-layer` is the layer-level check this demo grew
from (scripts/check_layer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent
SERVE_MESH = ("ici_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=-1")


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]: a preset name or .yml path "
                 "(default tiny-lm), then overrides for training")
  p.add_argument("--out", default="runs/demo", help="folder for every output of the demo")
  p.add_argument("--target", type=float, default=0.99,
                 help="stop training at this held-out recall accuracy (0: run every step)")
  p.add_argument("--processes", type=int, default=2, help="training processes (launch_local.py)")
  p.add_argument("--requests", type=int, default=32, help="requests in the serving trace")
  p.add_argument("--timeout", type=float, default=900, help="seconds before a stage is killed")
  args = p.parse_args(argv)
  config, overrides = "tiny-lm", list(args.args)
  if overrides and "=" not in overrides[0]:
    config = overrides.pop(0)
  bad = [o for o in overrides if "=" not in o]
  if bad:
    p.error(f"expected key=value overrides after the config, got {bad}")
  args.config, args.overrides = config, overrides
  return args


def _run(title: str, command: list[str], env: dict[str, str], timeout: float) -> float:
  """Run one stage, streaming its output (less gloo's per-connection chatter)."""
  print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
  start = time.perf_counter()
  with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, bufsize=1) as process:
    for line in process.stdout:
      if "[Gloo] Rank" not in line:
        print(line, end="", flush=True)
    status = process.wait(timeout=timeout)
  if status:
    raise SystemExit(f"demo: {title} failed (exit status {status})")
  return time.perf_counter() - start


def commands(args: argparse.Namespace) -> tuple[list[str], list[str], pathlib.Path]:
  """The training and serving command lines, and the checkpoint directory between them."""
  out = pathlib.Path(args.out)
  checkpoints = out / "train" / "checkpoints"
  train = [sys.executable, str(SCRIPTS / "launch_local.py"), "-n", str(args.processes),
           "--cpu-devices", str(8 // args.processes), "--timeout", str(args.timeout), "--",
           str(SCRIPTS / "train.py"), args.config, f"output_dir={out / 'train'}",
           f"checkpoint_dir={checkpoints}", f"stop_at_accuracy={args.target}",
           "checkpoint_period=100", *args.overrides, "--no-progress"]
  serve = [sys.executable, str(SCRIPTS / "serve.py"), str(checkpoints), *SERVE_MESH,
           "--requests", str(args.requests), "--rate", "inf", "--single-kind",
           "--out", str(out / "serve")]  # one compiled step kind: on CPU compiling dominates
  return train, serve, checkpoints


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the launcher sets each process's device count
  train, serve, _ = commands(args)
  train_s = _run(f"train {args.config} ({args.processes} processes x "
                 f"{8 // args.processes} CPU devices)", train, env, args.timeout)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  serve_s = _run("serve the checkpoint (1 process x 8 CPU devices, another mesh)", serve, env,
                 args.timeout)

  summary = json.loads((out / "train" / "train_log.json").read_text())["summary"]
  final = summary["final_eval"]
  print("\n=== summary")
  print(f"train : {summary['steps_done']} steps in {train_s:.0f} s on {summary['devices']} "
        f"devices in {summary['processes']} processes (mesh {summary['mesh']}), held-out "
        f"recall accuracy {final['accuracy']:.4f} at step {final['step']} (target {args.target})")
  print(f"serve : {serve_s:.0f} s, table above")
  print(f"files : {out / 'train' / 'train_log.json'}, {out / 'train' / 'train_curves.png'}, "
        f"{out / 'serve' / 'serve.json'}, {out / 'serve'}/serve_*.png")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
