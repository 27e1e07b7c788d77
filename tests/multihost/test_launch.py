"""scripts/launch_local.py and the multi-process test helper: processes get the coordinator,
output is prefixed, a failure or a hang ends every process, and the failure message shows
each process's output. Most commands here are plain Python (no JAX) and take well under 1 s."""

import sys
import time

import pytest

from helpers.multiprocess import run_in_processes
from meshattn.scripts import launch_local

PY = sys.executable


def test_each_process_gets_the_coordinator_and_prefixed_output(capsys):
  code = ("import os; e = os.environ; print(e['MESHATTN_PROCESS_ID'], e['MESHATTN_NUM_PROCESSES'], "
          "e['MESHATTN_COORDINATOR_ADDRESS'] == e['JAX_COORDINATOR_BIND_ADDRESS'], "
          "e['MESHATTN_COORDINATOR_ADDRESS'].startswith('127.0.0.1:'), e['XLA_FLAGS'])")
  assert launch_local.main(["-n", "3", "--cpu-devices", "4", "--", "-c", code]) == 0
  lines = sorted(capsys.readouterr().out.splitlines())
  assert [line.split()[:5] for line in lines] == [
    [f"[p{i}]", str(i), "3", "True", "True"] for i in range(3)]
  assert all("--xla_force_host_platform_device_count=4" in line for line in lines)
  assert all(line.count("device_count=") == 1 for line in lines)  # replaced, not appended


def test_gpus_per_process_get_their_own_block():
  envs = [launch_local.process_env(i, 2, 1234, gpus_per_process=2, base={}) for i in range(2)]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
  assert "XLA_FLAGS" not in envs[0] and "JAX_PLATFORMS" not in envs[0]


def test_a_failure_kills_the_others_and_is_the_exit_status(capsys):
  # Process 1 fails at once; process 0 would sleep for a minute (as if waiting in a collective).
  code = ("import os, sys, time; i = int(os.environ['MESHATTN_PROCESS_ID']); print('up', i); "
          "sys.exit(3) if i == 1 else time.sleep(60)")
  start = time.monotonic()
  status = launch_local.main(["-n", "2", "--grace", "0.5", "--", "-c", code])
  assert status == 3
  assert time.monotonic() - start < 20
  captured = capsys.readouterr()
  assert "[p0] up 0" in captured.out and "[p1] up 1" in captured.out
  assert "process 1 exited with 3" in captured.err and "process 0 killed" in captured.err


def test_a_hang_is_killed_at_the_timeout():
  # SIGTERM is ignored here, as JAX ignores it: only SIGKILL ends the process.
  code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('hang'); "
          "time.sleep(60)")
  start = time.monotonic()
  result = launch_local.run_processes([PY, "-c", code], 2, timeout=1.5)
  assert result.timed_out and result.status == launch_local.TIMEOUT_STATUS
  assert sorted(result.killed) == [0, 1] and time.monotonic() - start < 20
  assert "process 0: killed" in result.report() and "hang" in result.report()


def test_launcher_needs_a_command():
  with pytest.raises(SystemExit):
    launch_local.main(["-n", "2"])


def _fails_on_process_one():
  import jax

  pid, count, local = jax.process_index(), jax.process_count(), jax.local_device_count()
  print(f"process {pid} of {count}, {local} devices")
  if jax.process_index() == 1:
    raise RuntimeError("boom on process 1")


def test_helper_failure_shows_every_process_output():
  with pytest.raises(pytest.fail.Exception) as failure:
    run_in_processes(_fails_on_process_one, timeout=60)
  message = str(failure.value)
  assert "2 processes x 4 devices failed" in message
  assert "process 0 of 2, 4 devices" in message and "process 1 of 2, 4 devices" in message
  assert "RuntimeError: boom on process 1" in message
