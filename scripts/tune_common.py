"""What the tuning sweeps (scripts/tune_decode.py, scripts/tune_flash_pallas_gpu.py) share:
their common flags, the GPU-or-smoke check, the time box that shares a wall-clock budget
between the sweep's groups of candidates, and the JSON they write."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax


def tuning_parser(doc: str, out_name: str, *, quick_help: str, budget_s: float,
                  budget_help: str) -> argparse.ArgumentParser:
  """A parser with the flags every sweep takes (--out, --quick, --cpu-smoke, --budget-s,
  --iters and the head shape); the sweep adds its own."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--out", default="tune_out", help=f"folder for {out_name}")
  p.add_argument("--quick", action="store_true", help=quick_help)
  p.add_argument("--cpu-smoke", action="store_true",
                 help="interpret mode on CPU, tiny shapes (checks the script, times nothing real)")
  p.add_argument("--budget-s", type=float, default=budget_s, help=budget_help)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  return p


def sweep_platform(args) -> str | None:
  """The platform a sweep runs on, or None (after saying why) off a GPU without --cpu-smoke."""
  platform = jax.default_backend()
  if platform != "gpu" and not args.cpu_smoke:
    print(f"platform {platform}: the sweep needs a GPU (or --cpu-smoke)")
    return None
  return platform


class TimeBox:
  """A wall-clock budget shared by `groups` groups of candidates: each group, when it starts,
  gets an equal share of what is left, so a slow early group cannot starve the last ones.
  A group's first candidate always runs; later ones only within its share."""

  def __init__(self, seconds: float, groups: int):
    self._deadline = time.perf_counter() + seconds
    self._groups_left = groups

  def next_share(self) -> float:
    """Start a group: the perf_counter time its share ends."""
    now = time.perf_counter()
    end = now + max(self._deadline - now, 0) / max(self._groups_left, 1)
    self._groups_left -= 1
    return end

  def drop(self, groups: int) -> None:
    """Groups that will not run (their problem could not be built): the rest share their time."""
    self._groups_left -= groups


def past_share(index: int, share_end: float) -> bool:
  """Whether candidate `index` of a group is cut by the budget (the first never is)."""
  return index > 0 and time.perf_counter() > share_end


def write_results(out: str, name: str, meta: dict, rows: list, best: dict) -> pathlib.Path:
  """<out>/<name>: {"meta", "rows" (dataclasses), "best"} as JSON; prints and returns the path."""
  folder = pathlib.Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / name
  path.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows],
                              "best": best}, indent=1, default=str))
  print(f"wrote {path}")
  return path
