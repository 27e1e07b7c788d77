"""Train the decoder LM on multi-query associative recall, from YAML.

    python scripts/train.py tiny-lm                          # a preset, a .yml path, or base
    python scripts/train.py tiny-lm steps=400 learning_rate=3e-3 checkpoint_period=100
    python scripts/train.py tiny-lm checkpoint_period=100 --resume    # continue bit-exactly
    python scripts/launch_local.py -n 2 --cpu-devices 4 -- scripts/train.py tiny-lm

Shows a progress bar (loss, accuracy on the batch's answers, held-out
accuracy, tokens/s), writes `<output_dir>/train_log.json` and
`<output_dir>/train_curves.png` at the end, and Orbax checkpoints every
`checkpoint_period` steps (docs/training.md). As several processes (the
launcher, or a cluster's own start-up) each process feeds only its rows; the
data axis then spans the processes (`dcn_data_parallelism=-1`) unless the
overrides set a dcn key.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("config", help="preset name (tiny-lm, lm-1b, ...), a .yml path or 'base'")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in the checkpoint directory")
  parser.add_argument("--stop-at-step", type=int, default=None,
                      help="stop (and checkpoint) after this step, as if preempted")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser.parse_intermixed_args(argv)  # options before, between or after the overrides


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  from meshattn.sharding import initialize_from_env
  initialize_from_env()  # under scripts/launch_local.py: join the other processes first
  import jax

  from meshattn.configs import load_config
  from meshattn.scripts.train_loop import train

  overrides = list(args.overrides)
  if jax.process_count() > 1 and not any(o.startswith("dcn_") for o in overrides):
    overrides = ["dcn_data_parallelism=-1"] + overrides
  cfg = load_config(args.config, *overrides)
  if jax.process_index() == 0:
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in "
          f"{jax.process_count()} process(es); config: {args.config} {' '.join(overrides)}")
  summary = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step,
                  progress=not args.no_progress)
  for key in ("history", "evals", "params"):
    summary.pop(key)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
