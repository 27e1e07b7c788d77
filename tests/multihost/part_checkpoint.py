"""Part of test_two_processes.py: Orbax across processes. `run` saves from 2 processes x
4 devices (parameters split between them) and restores in the same 2 on another mesh;
`check` restores the same checkpoint in 1 process x 8 devices.

The parameters are `Attention(cfg, rngs=nnx.Rngs(0))`'s, which `check` rebuilds
unsharded: every restore must give them back bit-exactly, placed as the target
mesh's rules say, and differ from the target's own initialisation (the restore
mattered).
"""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers import Attention
from meshattn.sharding import create_mesh, get_param_shardings, shard_module

SAVE_MESH = ["dcn_fsdp_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]
RESTORE_MESH_2 = ["dcn_data_parallelism=2", "ici_fsdp_parallelism=-1"]
RESTORE_MESH_1 = ["ici_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=2"]
FEATURES = ["use_bias=true", "use_qk_norm=true", "attention_sink=true"]


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _restore(path, cfg):
  """A freshly built (abstract) layer on `cfg`'s mesh, its parameters read from `path`."""
  mesh = create_mesh(cfg)
  target = nnx.eval_shape(lambda: Attention(cfg, mesh=mesh, rngs=nnx.Rngs(7)))
  state = nnx.state(target, nnx.Param)
  shardings = get_param_shardings(state, mesh, target.settings.logical_axis_rules)
  abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  restored = ocp.StandardCheckpointer().restore(path, nnx.to_pure_dict(abstract))
  shardings = nnx.to_pure_dict(shardings)
  for key, value in _flat(restored).items():
    assert value.sharding.is_equivalent_to(_flat(shardings)[key], value.ndim), key
  return restored


def run(out_dir):
  """In each of the 2 processes: save the sharded parameters, restore them on another mesh."""
  from jax.experimental import multihost_utils

  gather = lambda tree: jax.tree.map(
    lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)
  cfg = load_config("tiny", *FEATURES, *SAVE_MESH)
  mesh = create_mesh(cfg)
  model = shard_module(Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0)), mesh, cfg.logical_axis_rules)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert not params["query"]["kernel"].is_fully_addressable, "not split between the processes"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(pathlib.Path(out_dir) / "attn", params)
  checkpointer.wait_until_finished()

  other_mesh = load_config("tiny", *FEATURES, *RESTORE_MESH_2)
  restored = _restore(pathlib.Path(out_dir) / "attn", other_mesh)
  saved, back = _flat(gather(params)), _flat(gather(restored))
  assert saved.keys() == back.keys(), (sorted(saved), sorted(back))
  for key in saved:
    np.testing.assert_array_equal(back[key], saved[key], err_msg=key)
  if jax.process_index() == 0:
    np.savez(pathlib.Path(out_dir) / "saved.npz", **saved)


def check(out_dir):
  """Here, on 8 devices: the checkpoint `run` wrote restores to the parameters it saved."""
  out_dir = pathlib.Path(out_dir)
  cfg = load_config("tiny", *FEATURES, *RESTORE_MESH_1)
  want = _flat(nnx.to_pure_dict(nnx.state(Attention(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  saved = dict(np.load(out_dir / "saved.npz"))
  restored = _flat(_restore(out_dir / "attn", cfg))
  fresh = _flat(nnx.to_pure_dict(nnx.state(Attention(cfg, rngs=nnx.Rngs(7)), nnx.Param)))
  assert saved.keys() == restored.keys() == want.keys(), (sorted(saved), sorted(restored))
  for key in want:
    np.testing.assert_array_equal(saved[key], want[key], err_msg=f"saved {key}")
    np.testing.assert_array_equal(np.asarray(restored[key]), want[key], err_msg=f"restored {key}")
  assert any(not np.array_equal(fresh[k], want[k]) for k in want), "the restore changed nothing"
