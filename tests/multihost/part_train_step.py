"""Part of test_two_processes.py: 2 processes x 4 CPU devices equal 1 process x 8, the mesh
from `dcn_*` and the layer's train step.

`run` (in both processes) checks that the mesh groups devices by process (CPU
devices all report slice 0) and runs the layer's train forward + backward over
global arrays built from each process's rows. `check` (in the test's process,
8 fake devices) computes the same step on the ici-only mesh of the same layout
and compares: the forward bit-exact, gradients within 1e-6 of their scale (the
cross-process reductions go through gloo, in another order).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers import Attention
from meshattn.sharding import (
  create_mesh,
  make_global_array,
  process_local_data,
  process_part,
  shard_module,
)

# name: (2 processes, 1 process): the same mesh shape and device layout, dcn vs ici.
TOPOLOGIES = {
  "dcn_data": (
    ["dcn_data_parallelism=2", "ici_fsdp_parallelism=-1"],
    ["ici_data_parallelism=2", "ici_fsdp_parallelism=-1"],
  ),
  "dcn_fsdp": (
    ["dcn_fsdp_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"],
    ["ici_fsdp_parallelism=4", "ici_tensor_parallelism=2"],
  ),
}
BATCH, LENGTH = 8, 16
ROWS = ("activation_batch", "activation_length")
GRAD_TOLERANCE = 1e-6  # of the largest |gradient|; measured ~1e-7 (float32 reduction order)


def _inputs(emb_dim):
  """x [B, T, D], packed positions and segments [B, T], a fixed cotangent [B, T, D]."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, LENGTH, emb_dim), dtype=np.float32)
  pos = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(BATCH, 0).astype(np.int32)
  seg = np.concatenate([np.ones(10), 2 * np.ones(6)])[None].repeat(BATCH, 0).astype(np.int32)
  cot = rng.standard_normal((BATCH, LENGTH, emb_dim), dtype=np.float32)
  return x, pos, seg, cot


def _train_step(model, x, pos, seg, cot):
  """(out, d/dx, d/dparams) of sum(out * cot), in one jit."""

  @nnx.jit
  def step(model, x, pos, seg, cot):
    def loss(model, x):
      out = model(x, x, inputs_positions=pos, decoder_segment_ids=seg, model_mode="train")
      return jnp.sum(out * cot), out

    (_, out), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, g_x, nnx.to_pure_dict(g_params)

  return step(model, x, pos, seg, cot)


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _check_mesh(mesh, overrides):
  """Each dcn coordinate holds one process's devices, as mesh_utils' process granules do."""
  from jax.experimental import mesh_utils

  assert {d.slice_index for d in jax.devices()} == {0}, "CPU devices should all be slice 0"
  cfg = dict(o.split("=") for o in overrides)
  dcn = [int(cfg.get(f"dcn_{a}_parallelism", 1)) for a in mesh.axis_names]
  ici = [n // d for n, d in zip(mesh.devices.shape, dcn)]
  want = mesh_utils.create_hybrid_device_mesh(ici, dcn, jax.devices(), process_is_granule=True)
  assert (mesh.devices == want).all(), (mesh.devices, want)
  axis = next(i for i, d in enumerate(dcn) if d > 1)
  for p in range(2):
    block = np.take(mesh.devices, range(p * ici[axis], (p + 1) * ici[axis]), axis=axis)
    assert {d.process_index for d in block.flat} == {p}, (p, block)


def run(out_dir):
  """In each of the 2 processes: the mesh checks and the train step; arrays to out_dir."""
  from jax.experimental import multihost_utils

  # No grouping has 4 equal parts here: the error names what was tried.
  with pytest.raises(ValueError, match=r"slices: the devices report 1 slices, not 4; "
                     r"processes: the devices report 2 processes, not 4"):
    create_mesh(load_config("tiny", "dcn_data_parallelism=4", "ici_fsdp_parallelism=-1"))
  results = {}
  for name, (overrides, _) in TOPOLOGIES.items():
    cfg = load_config("tiny", *overrides)
    mesh = create_mesh(cfg)
    _check_mesh(mesh, overrides)
    model = Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    rules = model.settings.logical_axis_rules
    shard_module(model, mesh, rules)
    if name == "dcn_fsdp":  # embed over fsdp: the parameters really span both processes
      assert not model.query.kernel[...].is_fully_addressable
    host = _inputs(cfg.emb_dim)
    names = [cfg.input_axis_names, ROWS, ROWS, cfg.input_axis_names]
    local = [process_part(a, n, mesh, rules) for a, n in zip(host, names)]
    x, pos, seg, cot = [make_global_array(a, n, mesh, rules) for a, n in zip(local, names)]
    assert x.shape == host[0].shape and not x.is_fully_addressable
    # 1 row per process does not split over the batch shards; replicated, each would need 2.
    with pytest.raises(ValueError, match=r"does not divide over its mesh axes"):
      make_global_array(local[0][:1], cfg.input_axis_names, mesh, rules)
    np.testing.assert_array_equal(process_local_data(x), local[0])  # the inverse, exactly
    out, g_x, g_params = _train_step(model, x, pos, seg, cot)
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    results[name] = {"out": gather(out), "local_out": process_local_data(out),
                     "local_x": local[0], "g_x": gather(g_x),
                     **{"g" + k: gather(v) for k, v in _flat(g_params).items()}}
  pid = jax.process_index()
  for name, arrays in results.items():
    np.savez(pathlib.Path(out_dir) / f"{name}_p{pid}.npz", **arrays)


def _reference(name):
  cfg = load_config("tiny", *TOPOLOGIES[name][1])
  mesh = create_mesh(cfg)
  model = Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  shard_module(model, mesh, model.settings.logical_axis_rules)
  out, g_x, g_params = _train_step(model, *map(jnp.asarray, _inputs(cfg.emb_dim)))
  return {"out": np.asarray(out), "g_x": np.asarray(g_x),
          **{"g" + k: np.asarray(v) for k, v in _flat(g_params).items()}}


def check(out_dir):
  """Here, on 8 devices: what `run` wrote equals the same step on one process."""
  out_dir = pathlib.Path(out_dir)
  for name in TOPOLOGIES:
    want = _reference(name)
    rows = BATCH // 2
    for pid in range(2):
      got = dict(np.load(out_dir / f"{name}_p{pid}.npz"))
      np.testing.assert_array_equal(got["out"], want["out"], err_msg=f"{name} p{pid} forward")
      # Batch over (data, fsdp), dcn outermost: process p holds rows [4p, 4p + 4).
      mine = slice(pid * rows, (pid + 1) * rows)
      host_x = _inputs(want["out"].shape[-1])[0]
      np.testing.assert_array_equal(got["local_x"], host_x[mine], err_msg=name)
      np.testing.assert_array_equal(got["local_out"], want["out"][mine], err_msg=name)
      assert set(got) == set(want) | {"local_out", "local_x"}, sorted(got)
      for key in want:
        if key.startswith("g"):
          scale = np.max(np.abs(want[key]))
          np.testing.assert_allclose(got[key], want[key], rtol=0, atol=GRAD_TOLERANCE * scale,
                                     err_msg=f"{name} p{pid} {key}")
