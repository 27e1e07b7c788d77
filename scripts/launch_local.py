"""Run a meshattn script as N processes on this machine, as if on N hosts.

    python scripts/launch_local.py -n 2 --cpu-devices 4 -- scripts/check_layer.py key=value ...
    python scripts/launch_local.py -n 2 --gpus-per-process 4 -- scripts/train.py ...

For trying a multi-host layout (`dcn_*` keys, global arrays) without a
cluster manager. Each process gets the coordinator (a free loopback port) in
`MESHATTN_COORDINATOR_ADDRESS` / `MESHATTN_NUM_PROCESSES` / `MESHATTN_PROCESS_ID`;
the script joins with `meshattn.sharding.initialize_from_env()` before it
touches JAX. `--cpu-devices K` gives each process K fake CPU devices,
`--gpus-per-process K` its own K GPUs (CUDA_VISIBLE_DEVICES). Output lines are
prefixed `[pI]`. When a process fails the others are killed after a short
grace (they would wait for it in collectives forever), and the launcher exits
with the first failure's status; `--timeout` bounds the whole run (124).

Processes are killed with SIGKILL: JAX catches SIGTERM (preemption notices).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from meshattn.sharding.multihost import distributed_env

TIMEOUT_STATUS = 124
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  """A TCP port free on loopback now (the coordinator binds it moments later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  process_id: int,
  num_processes: int,
  port: int,
  *,
  cpu_devices: int | None = None,
  gpus_per_process: int | None = None,
  base: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """The environment of process `process_id`: coordinator, devices, unbuffered output."""
  env = dict(os.environ if base is None else base)
  address = f"127.0.0.1:{port}"
  env.update(distributed_env(address, num_processes, process_id))
  # JAX's own variable: the coordinator listens on loopback only, not on every interface.
  env["JAX_COORDINATOR_BIND_ADDRESS"] = address
  env["PYTHONUNBUFFERED"] = "1"  # lines arrive as printed, and survive a SIGKILL
  if cpu_devices is not None:
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={cpu_devices}"] + flags)
    env["JAX_PLATFORMS"] = "cpu"
  if gpus_per_process is not None:
    first = process_id * gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_process))
  return env


@dataclasses.dataclass
class Result:
  """How each process ended: its exit status (-9 when killed) and output lines."""

  returncodes: list[int]
  outputs: list[list[str]]
  timed_out: bool
  killed: list[int]  # processes killed because another failed or time ran out

  @property
  def status(self) -> int:
    """0 when all succeeded; 124 on timeout; else the first failure's status."""
    if self.timed_out:
      return TIMEOUT_STATUS
    failed = [rc for i, rc in enumerate(self.returncodes) if rc and i not in self.killed]
    failed = failed or [rc for rc in self.returncodes if rc]
    if not failed:
      return 0
    return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal s: 128 + s

  def report(self) -> str:
    """Every process's status and output, for a failure message."""
    parts = []
    for i, (rc, lines) in enumerate(zip(self.returncodes, self.outputs)):
      how = "killed (another failed or time ran out)" if i in self.killed else f"exit {rc}"
      parts.append(f"----- process {i}: {how} -----\n" + "".join(lines))
    return "\n".join(parts)


def _kill(proc: subprocess.Popen) -> None:
  """SIGKILL the process's whole session (a `timeout` wrapper and what it started)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_processes(
  command: Sequence[str],
  num_processes: int,
  *,
  cpu_devices: int | None = None,
  gpus_per_process: int | None = None,
  timeout: float | None = None,
  grace: float = 3.0,
  env: Mapping[str, str] | None = None,
  on_line: Callable[[int, str], None] | None = None,
) -> Result:
  """Start `command` N times with the coordinator set up; wait, kill on failure or timeout.

  `on_line(process_id, line)` sees every output line (stdout and stderr
  merged) as it comes; all lines are also kept in the Result.
  """
  port = free_port()
  outputs: list[list[str]] = [[] for _ in range(num_processes)]
  procs, readers = [], []
  # A `timeout` wrapper ends the processes even if this launcher itself is killed.
  wrapper = []
  if timeout is not None and shutil.which("timeout"):
    wrapper = ["timeout", "-s", "KILL", str(int(timeout) + 10)]
  deadline = None if timeout is None else time.monotonic() + timeout
  failed_at, timed_out, killed = None, False, []
  try:
    for i in range(num_processes):
      proc_env = process_env(i, num_processes, port, cpu_devices=cpu_devices,
                             gpus_per_process=gpus_per_process, base=env)
      proc = subprocess.Popen(
        wrapper + list(command), env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
      )
      procs.append(proc)

      def read(i=i, stream=proc.stdout):
        for line in stream:
          outputs[i].append(line)
          if on_line is not None:
            on_line(i, line)

      reader = threading.Thread(target=read, daemon=True)
      reader.start()
      readers.append(reader)

    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = now
      late = failed_at is not None and now - failed_at > grace
      timed_out = deadline is not None and now > deadline
      if late or timed_out:
        killed = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in killed:
          _kill(procs[i])
        break
      time.sleep(0.05)
  finally:  # also on KeyboardInterrupt: never leave processes behind
    for p in procs:
      if p.poll() is None:
        _kill(p)
    for p in procs:
      p.wait()
    for r in readers:
      r.join(timeout=5)
  return Result([p.returncode for p in procs], outputs, timed_out, killed)


_print_lock = threading.Lock()  # one reader thread per process: whole lines, never mixed


def _print_prefixed(process_id: int, line: str) -> None:
  with _print_lock:
    sys.stdout.write(f"[p{process_id}] {line}")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], usage="%(prog)s [options] -- script.py [args ...]"
  )
  parser.add_argument("-n", "--num-processes", type=int, default=2)
  parser.add_argument("--cpu-devices", type=int, help="fake CPU devices per process")
  parser.add_argument("--gpus-per-process", type=int, help="GPUs per process")
  parser.add_argument("--timeout", type=float, help="seconds before every process is killed")
  parser.add_argument("--grace", type=float, default=3.0,
                      help="seconds the others get after one fails (default 3)")
  split = argv.index("--") if "--" in argv else len(argv)
  args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
  if not command:
    parser.error("name the script after `--`")
  if args.num_processes < 1:
    parser.error("-n must be at least 1")
  # A script path or `-m module` runs under this interpreter (the venv's).
  try:
    result = run_processes(
      [sys.executable] + command, args.num_processes, cpu_devices=args.cpu_devices,
      gpus_per_process=args.gpus_per_process, timeout=args.timeout, grace=args.grace,
      on_line=_print_prefixed,
    )
  except KeyboardInterrupt:  # run_processes has killed them all
    print("launch_local: interrupted, processes killed", file=sys.stderr)
    return 130
  for i, rc in enumerate(result.returncodes):
    if i in result.killed:
      print(f"launch_local: process {i} killed", file=sys.stderr)
    elif rc:
      print(f"launch_local: process {i} exited with {rc}", file=sys.stderr)
  if result.timed_out:
    print(f"launch_local: timed out after {args.timeout} s", file=sys.stderr)
  return result.status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
