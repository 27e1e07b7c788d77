"""2 processes x 4 CPU devices (jax.distributed on loopback) equal 1 process x 8.

The suite's multi-process checks share one launch: starting the processes
(Python, JAX, the distributed client, imports) costs seconds of CPU each time,
so `_worker` runs every part's `run` in the same 2 processes, one after the
other, and the test then runs every part's `check` here, on 8 fake devices:

  train step     part_train_step.py: meshes from dcn_*, the layer's forward +
                 backward over global arrays;
  checkpoint     part_checkpoint.py: Orbax save from 2 processes, restore in 2
                 on another mesh and in 1;
  serving        part_serving.py: prefill + decode on a contiguous and a paged
                 int8 cache, a rejected step on every process, the cache kept;
  engine         part_engine.py: the serving engine (a real-time trace, chunked
                 prompts, slot reuse, sampling) gives the tokens of 1 process;
  training loop  part_train_loop.py: `train` on 2 processes logs the losses of
                 1, its checkpoint restores here onto another mesh.

A part that raises in the processes is recorded (its traceback, per process)
and the next part runs; the test checks every part whose processes finished it
and fails once at the end, naming each failed part with its error. A part that
fails on one process only leaves the other waiting in a collective: the launch
then times out and the failure shows every process's output (each part prints
its name as it starts).
"""

import pathlib
import time
import traceback

import jax
import pytest

pytest.register_assert_rewrite("multihost")  # plain asserts in the parts say what they saw

from helpers.multiprocess import run_in_processes  # noqa: E402
from multihost import (  # noqa: E402
  part_checkpoint,
  part_engine,
  part_serving,
  part_train_loop,
  part_train_step,
)

PARTS = {"train step": part_train_step, "checkpoint": part_checkpoint,
         "serving": part_serving, "engine": part_engine, "training loop": part_train_loop}
TIMEOUT = 300  # seconds for the whole launch: ~25 s on an idle 2-core machine


def _part_dir(out_dir, name):
  return pathlib.Path(out_dir) / name.replace(" ", "_")


def _worker(out_dir):
  pid = jax.process_index()
  for name, part in PARTS.items():
    part_dir = _part_dir(out_dir, name)
    part_dir.mkdir(parents=True, exist_ok=True)
    print(f"part {name!r}: start", flush=True)
    start = time.monotonic()
    try:
      part.run(str(part_dir))
    except (Exception, pytest.fail.Exception):  # recorded (pytest.raises' failure too)
      error = traceback.format_exc()
      (part_dir / f"failed_p{pid}.txt").write_text(error)
      print(f"part {name!r} failed:\n{error}", flush=True)
    else:
      print(f"part {name!r}: done in {time.monotonic() - start:.1f} s", flush=True)


def test_two_processes_equal_one(tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  run_in_processes(_worker, str(tmp_path), timeout=TIMEOUT)
  failures = []
  for name, part in PARTS.items():
    part_dir = _part_dir(tmp_path, name)
    errors = sorted(part_dir.glob("failed_p*.txt"))
    if errors:
      failures.append(f"{name}: failed in the 2 processes\n"
                      + "\n".join(f"{e.stem}:\n{e.read_text()}" for e in errors))
      continue
    try:
      part.check(part_dir)
    except (Exception, pytest.fail.Exception):
      failures.append(f"{name}: the 1-process check failed\n{traceback.format_exc()}")
  if failures:
    pytest.fail(f"{len(failures)} of {len(PARTS)} parts failed:\n\n" + "\n\n".join(failures),
                pytrace=False)
