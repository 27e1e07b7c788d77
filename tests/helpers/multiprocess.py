"""Run a test's function in N processes joined by jax.distributed on loopback.

    from helpers.multiprocess import run_in_processes

    def _worker(out_dir):            # module level; runs in every process
      cfg = load_config("tiny", "dcn_data_parallelism=2")
      ...                            # jax.distributed is already initialized
      np.savez(f"{out_dir}/p{jax.process_index()}.npz", ...)

    def test_something(tmp_path):
      run_in_processes(_worker, str(tmp_path))   # 2 processes x 4 CPU devices
      ...                                        # compare with this process's 8 devices

Each process is `python -c RUNNER`: it joins the job through
`meshattn.sharding.initialize_from_env()` (the launcher's variables), then
imports the test module from its file and calls the function with the given
JSON-able arguments, so the module's imports run after JAX's distributed
start-up. XLA flags are the suite's own but for the device count, so that the
processes compile what this process compiles (bit-exact comparisons). A
process that fails gets the others killed; a hang is killed with SIGKILL at
`timeout` (JAX catches SIGTERM). On failure the test fails with every
process's output.

Cost: a few seconds of CPU per process per launch (Python, JAX, the
distributed client, imports) before the compiles, so the suite launches once:
tests/multihost/test_two_processes.py runs every multi-process part in one job.
"""

from __future__ import annotations

import inspect
import json
import pathlib
import sys

import pytest

from meshattn.scripts.launch_local import Result, run_processes

TESTS_DIR = pathlib.Path(__file__).resolve().parents[1]

RUNNER = """
import importlib.util, json, sys
path, name, tests_dir, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.path.insert(0, tests_dir)
from meshattn.sharding import initialize_from_env
if not initialize_from_env():
  raise SystemExit("multiprocess runner: the MESHATTN_* variables are not set")
spec = importlib.util.spec_from_file_location("multiprocess_target", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
getattr(module, name)(*args)
"""


def run_in_processes(
  func, *args, num_processes: int = 2, devices_per_process: int = 4, timeout: float = 180
) -> Result:
  """Call module-level `func(*args)` in `num_processes` processes; fail the test if any fails."""
  if func.__qualname__ != func.__name__:
    raise ValueError(f"{func.__qualname__}: the processes import it by name; make it module-level")
  path = inspect.getsourcefile(func)
  command = [sys.executable, "-c", RUNNER, path, func.__name__, str(TESTS_DIR), json.dumps(args)]
  result = run_processes(command, num_processes, cpu_devices=devices_per_process, timeout=timeout)
  if result.status:
    what = "timed out" if result.timed_out else f"failed (status {result.status})"
    pytest.fail(
      f"{func.__name__} in {num_processes} processes x {devices_per_process} devices {what}\n"
      + result.report(),
      pytrace=False,
    )
  return result
