"""Part of test_two_processes.py: the serving engine as 2 processes x 4 CPU devices
equals 1 process x 8 devices.

In `run` both processes build the same decoder on a mesh whose data axis spans them
(`dcn_data_parallelism=2`), then serve the same requests through `Engine.run` (a
real-time trace: each process takes process 0's arrivals) and `submit` / `step`:
chunked prompts, slots reused, a sampled request beside greedy ones. `check` serves the
same on the test's 8 devices (ici only); the tokens must agree exactly, and the greedy
ones equal an uncached greedy decode.
"""

import json
import pathlib

import jax
import numpy as np

from helpers.greedy import ENGINE_MESH, ENGINE_MODEL, build_decoder, greedy_reference
from meshattn.layers.engine import Engine, Request, SamplingParams

MESH = {2: ("dcn_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"),
        1: ENGINE_MESH}
PROMPTS = [7, 3, 12, 5, 9]
MAX_NEW = [4, 5, 3, 4, 3]
SAMPLED = {2: SamplingParams(temperature=5.0, top_k=20, seed=5)}  # far from greedy


def _model(processes):
  return build_decoder(ENGINE_MODEL, sharded=True, mesh_overrides=MESH[processes])


def _prompts(cfg):
  rng = np.random.default_rng(0)
  return [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in PROMPTS]


def _serve(processes) -> dict[str, list[int]]:
  cfg, model = _model(processes)
  prompts = _prompts(cfg)
  engine = Engine(model, num_slots=2, chunk_size=5, specialize=False)
  trace = [Request(i, p, MAX_NEW[i], 0.002 * i, SAMPLED.get(i, SamplingParams()))
           for i, p in enumerate(prompts)]
  tokens = {f"run{rid}": r.tokens for rid, r in engine.run(trace).items()}
  for i, p in enumerate(prompts[:2]):  # again by hand: the slots and pages were all freed
    engine.submit(p, MAX_NEW[i], id=10 + i)
  while not engine.idle:
    engine.step()
  tokens.update({f"step{rid}": engine.results()[rid].tokens for rid in (10, 11)})
  return tokens


def run(out_dir):
  """In each of the 2 processes: serve; each process writes what it got."""
  assert jax.process_count() == 2, jax.process_count()
  tokens = _serve(2)
  (pathlib.Path(out_dir) / f"tokens_p{jax.process_index()}.json").write_text(json.dumps(tokens))


def check(out_dir):
  """Here, on 8 devices: both processes got what one process gets; greedy = uncached."""
  want = _serve(1)
  for pid in (0, 1):
    got = json.loads((pathlib.Path(out_dir) / f"tokens_p{pid}.json").read_text())
    assert got == want, (pid, got, want)
  cfg, model = _model(1)
  for i, prompt in enumerate(_prompts(cfg)):
    greedy = greedy_reference(model, prompt, MAX_NEW[i])
    assert (want[f"run{i}"] != greedy) if i in SAMPLED else (want[f"run{i}"] == greedy), i
  assert want["step10"] == want["run0"] and want["step11"] == want["run1"]
