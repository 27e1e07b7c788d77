"""Part of test_two_processes.py: serving across 2 processes x 4 CPU devices equals
1 process x 8 (issues 14.1, 15.2, 15.3).

`run` runs, in both processes, a ragged prefill and decode steps through
`jit_step` over a contiguous and a paged int8 cache (the paged cache's page
manager gathers its tables on every process), then a prefill that would grow
every slot past max_length: it must raise StepRejected on every process,
promptly (no rendezvous timeout, no abort), with the cache unchanged, and
the next step (after freeing the full slot) must run. `check` computes the same on
the test's 8 devices; the outputs must agree bit for bit.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step
from meshattn.sharding import create_mesh, make_global_array, process_part, shard_module

# The paged cache is quantized (int8) too: three cache features in two launches' worth of
# compiles, for the suite's time.
CACHES = {"contiguous": [],
          "paged-int8": ["paged_kv_cache=true", "num_pages=32", "tokens_per_page=4",
                         "quantize_kvcache=true"]}
BATCH, PROMPT, STEPS, MAX_LENGTH = 4, 6, 2, 8
MESH = {2: ["dcn_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2"],
        1: ["ici_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2"]}


@jit_step(static_argnames="mode")
def _step(model, x, seg, mode):
  return model(x, decoder_segment_ids=seg, model_mode=mode)


def _inputs(emb_dim):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, PROMPT + STEPS + 1, emb_dim), dtype=np.float32)
  lengths = np.array([6, 3, 5, 1])
  seg = (np.arange(PROMPT)[None] < lengths[:, None]).astype(np.int32)  # right padding
  return x, seg, lengths


def _gather(a):
  from jax.experimental import multihost_utils
  if a.is_fully_addressable:
    return np.asarray(a)
  return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def _serve(processes: int, cache_kind: str) -> dict[str, np.ndarray]:
  cfg = load_config("tiny", *MESH[processes], *CACHES[cache_kind])
  mesh = create_mesh(cfg)
  model = Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  rules = model.settings.logical_axis_rules
  shard_module(model, mesh, rules)
  cache = model.init_cache(BATCH, MAX_LENGTH)
  x, seg, lengths = _inputs(cfg.emb_dim)
  rows_names = ("activation_batch", "activation_length")

  def glob(a, names):
    return make_global_array(process_part(a, names, mesh, rules), names, mesh, rules)

  paged = cache_kind.startswith("paged")
  slots = np.arange(BATCH)
  if paged:
    cache.reserve_for_step(slots, lengths)
  outs = [_step(model, glob(x[:, :PROMPT], cfg.input_axis_names), glob(seg, rows_names),
                "prefill")]
  for i in range(STEPS):
    if paged:
      cache.reserve_for_step(slots, 1)
    token = glob(x[:, PROMPT + i:PROMPT + i + 1], cfg.input_axis_names)
    outs.append(_step(model, token, None, "autoregressive"))
  result = {f"out{i}": _gather(o) for i, o in enumerate(outs)}
  # Rejected on every process: slot 0 holds 6 + 2 = max_length tokens already.
  before = {k: _gather(v) for k, v in nnx.to_flat_state(nnx.state(cache))
            if "rejected" not in k}
  if paged:
    cache.reserve_for_step(slots[1:], 1)  # slot 0 is full: max_length pages are all it has
  # The prompt's shape and segment ids again (no new compile): 6 more tokens pass max_length.
  over = glob(np.ones((BATCH, PROMPT, cfg.emb_dim), np.float32), cfg.input_axis_names)
  with pytest.raises(StepRejected, match="max_length=8"):
    _step(model, over, glob(np.ones_like(seg), rows_names), "prefill")
  for k, v in nnx.to_flat_state(nnx.state(cache)):
    if "rejected" not in k and "page" not in str(k):
      np.testing.assert_array_equal(_gather(v), before[k], err_msg=str(k))
  cache.reset(0)  # slot 0 is full: free it, as a serving loop does with a finished sequence
  token = glob(x[:, -1:], cfg.input_axis_names)
  result["after"] = _gather(_step(model, token, None, "autoregressive"))  # still usable
  result["lengths"] = _gather(cache.lengths[...])
  return result


def run(out_dir):
  """In each of the 2 processes: serve on both cache kinds; process 0 writes the outputs."""
  assert jax.process_count() == 2, jax.process_count()
  for kind in CACHES:
    result = _serve(2, kind)
    if jax.process_index() == 0:
      np.savez(pathlib.Path(out_dir) / f"{kind}.npz", **result)


def check(out_dir):
  """Here, on 8 devices: the same serving steps give what `run` wrote, bit for bit."""
  for kind in CACHES:
    want = _serve(1, kind)
    got = np.load(pathlib.Path(out_dir) / f"{kind}.npz")
    np.testing.assert_array_equal(got["lengths"], [0, 6, 8, 4], err_msg=f"{kind} lengths")
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{kind} {key}")
