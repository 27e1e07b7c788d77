"""Several processes (hosts) as one program: start-up from the environment, and the
global arrays that a multi-process jit takes and returns.

Every process runs the same program. A jitted step over a mesh that spans
processes takes *global* arrays: each process holds only the shards on its own
devices. The data pipeline, however, is per process: each host loads its own
rows. `make_global_array` turns each process's local rows into the global
array laid out by the same logical names the layer uses, and
`process_local_data` is its inverse for outputs (this process's rows, in the
order it fed them). `process_part` cuts a process's part out of a batch that
every process holds in full (demos, tests, a deterministic eval set).

Start-up: `initialize_from_env()` calls `jax.distributed.initialize` from
`MESHATTN_COORDINATOR_ADDRESS` / `MESHATTN_NUM_PROCESSES` /
`MESHATTN_PROCESS_ID`, which `scripts/launch_local.py` (and the multi-process
test helper) set; without them it does nothing, so a script calls it first
thing and runs unchanged as one process. On TPU pods, SLURM and Open MPI call
`jax.distributed.initialize()` without arguments instead (it finds its peers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .logical import Rules, logical_to_sharding, logical_to_spec

__all__ = [
  "COORDINATOR_ENV",
  "NUM_PROCESSES_ENV",
  "PROCESS_ID_ENV",
  "distributed_env",
  "initialize_from_env",
  "make_global_array",
  "process_local_data",
  "process_part",
]

COORDINATOR_ENV = "MESHATTN_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "MESHATTN_NUM_PROCESSES"
PROCESS_ID_ENV = "MESHATTN_PROCESS_ID"


def distributed_env(
  coordinator_address: str, num_processes: int, process_id: int
) -> dict[str, str]:
  """The environment variables that make `initialize_from_env` join this job."""
  return {
    COORDINATOR_ENV: coordinator_address,
    NUM_PROCESSES_ENV: str(num_processes),
    PROCESS_ID_ENV: str(process_id),
  }


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
  """`jax.distributed.initialize` from the MESHATTN_* variables; True if it joined a job.

  Call it before anything touches a JAX backend (`load_config` counts the
  devices). Does nothing when the variables are unset or JAX is already
  initialized (a script started by a cluster manager that initialized itself).
  """
  environ = os.environ if environ is None else environ
  names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
  present = [n for n in names if environ.get(n)]
  if not present:
    return False
  if len(present) != len(names):
    missing = sorted(set(names) - set(present))
    raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} missing")
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(
    coordinator_address=environ[COORDINATOR_ENV],
    num_processes=int(environ[NUM_PROCESSES_ENV]),
    process_id=int(environ[PROCESS_ID_ENV]),
  )
  return True


def _process_blocks(sharding: NamedSharding, global_shape: Sequence[int]) -> list[list[int]]:
  """Per dimension, the sorted distinct shard starts this process's devices hold."""
  indices = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
  return [sorted({idx[d].start or 0 for idx in indices}) for d in range(len(global_shape))]


def _shard_counts(sharding: NamedSharding, ndim: int) -> list[tuple[int, int]]:
  """Per dimension, (shards over all devices, shards this process holds)."""
  sizes = dict(sharding.mesh.shape)
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  counts = []
  for entry in spec:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    counts.append(int(np.prod([sizes[a] for a in axes], dtype=np.int64)))
  # A probe shape with one element per shard shows how many shards are local.
  local = [len(b) for b in _process_blocks(sharding, counts)]
  return list(zip(counts, local))


def _global_shape(sharding: NamedSharding, local_shape: Sequence[int]) -> tuple[int, ...]:
  """The global shape when each process holds only its own shards' rows."""
  shape = []
  for d, (total, local) in enumerate(_shard_counts(sharding, len(local_shape))):
    if total % local:
      raise ValueError(
        f"dimension {d}: this process holds {local} of {total} shards, not a whole share; "
        "pass global_shape"
      )
    shape.append(local_shape[d] * (total // local))
  return tuple(shape)


def make_global_array(
  local_data: Any,
  logical_names: Sequence[str | None],
  mesh: Mesh,
  rules: Rules,
  global_shape: Sequence[int] | None = None,
) -> jax.Array:
  """The global array whose process-local part is `local_data`, laid out by `logical_names`.

  Wraps `jax.make_array_from_process_local_data` with the logical rules: a
  dimension whose mesh axes span processes is split between them (each
  process passes its own rows), any other dimension is whole on every
  process. E.g. inputs `[B, T, D]` with `cfg.input_axis_names` and batch over
  `(data, fsdp)`: with `dcn_data_parallelism=2` each of 2 processes passes
  `B / 2` rows. With one process this is `jax.device_put(local_data, sharding)`.

  The global shape is inferred (each process holds an equal share) unless
  given. The sharding is the one the layer constrains the same tensor to,
  including the rules' divisibility check on the global shape; where that
  check drops a rule that splits a dimension across processes, each process
  would have to hold another share, so that raises.
  """
  local = np.asarray(local_data)
  names = tuple(logical_names)
  if global_shape is None:
    unchecked = NamedSharding(mesh, logical_to_spec(names, rules, mesh))
    global_shape = _global_shape(unchecked, local.shape)
    sharding = logical_to_sharding(names, mesh, rules, global_shape)
    # A rule dropped inside a process is harmless; one that changes the split is not.
    if _global_shape(sharding, local.shape) != global_shape:
      raise ValueError(
        f"logical names {names} for global shape {global_shape} shard as {sharding.spec}, "
        f"not {unchecked.spec}: a dimension does not divide over its mesh axes. Pick sizes "
        "that divide, or pass global_shape with each process's share of that sharding"
      )
  else:
    global_shape = tuple(global_shape)
    sharding = logical_to_sharding(names, mesh, rules, global_shape)
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def process_part(
  global_data: Any, logical_names: Sequence[str | None], mesh: Mesh, rules: Rules
) -> np.ndarray:
  """This process's share of a host array that every process holds in full.

  `make_global_array(process_part(x, ...), ...)` equals `x` laid out by the
  names: the way to feed one deterministic batch from several processes.
  """
  full = np.asarray(global_data)
  sharding = logical_to_sharding(tuple(logical_names), mesh, rules, full.shape)
  blocks = _process_blocks(sharding, full.shape)
  shard = sharding.shard_shape(full.shape)
  index = np.ix_(*[
    np.concatenate([np.arange(s, s + shard[d]) for s in starts]) for d, starts in enumerate(blocks)
  ])
  return full[index]


def process_local_data(x: jax.Array) -> np.ndarray:
  """The part of global `x` on this process's devices, as NumPy: `make_global_array`'s inverse.

  A dimension split across processes gives this process's rows, in the order
  its local data had; a dimension not split across processes comes whole.
  """
  blocks = _process_blocks(x.sharding, x.shape)
  shard = x.sharding.shard_shape(x.shape)
  out = np.zeros([len(b) * shard[d] for d, b in enumerate(blocks)], dtype=x.dtype)
  filled = np.zeros(out.shape, dtype=bool)
  for piece in x.addressable_shards:
    first = [blocks[d].index(i.start or 0) * shard[d] for d, i in enumerate(piece.index)]
    at = tuple(slice(f, f + n) for f, n in zip(first, shard))
    out[at] = np.asarray(piece.data)
    filled[at] = True
  if not filled.all():
    # The process's shards do not tile a block (an exotic device order): no local array exists.
    raise ValueError(f"this process's shards of {x.sharding} do not form one block")
  return out


def host_copy(x: jax.Array) -> np.ndarray:
  """All of global `x` as NumPy, the same on every process.

  Where other processes hold parts of it, they are gathered: a collective, so every
  process must call this at the same point of the program (as the serving engine and
  the page manager do: all processes run the same host loop). A replicated or
  process-local array is read without one.
  """
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.array(x)
  from jax.experimental import multihost_utils
  return np.array(multihost_utils.process_allgather(x, tiled=True))


def process0_value(value: int) -> int:
  """Process 0's integer `value`, on every process (one broadcast where there are several).

  A collective like `host_copy`: every process calls it at the same point. The serving
  engine agrees through it on how many requests of a real-time trace have arrived, since
  each process reads its own clock."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))
