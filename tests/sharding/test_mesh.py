"""create_mesh on the 8 fake CPU devices that tests/conftest.py sets up."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from meshattn.sharding import create_mesh, mesh_shape_string

BASE_AXES = ("data", "fsdp", "context", "tensor", "autoregressive")


def _config(mesh_axes=BASE_AXES, **sizes):
  """An attribute-style config; unspecified parallelism keys default to 1."""
  return types.SimpleNamespace(mesh_axes=tuple(mesh_axes), **sizes)


def test_eight_devices_available():
  assert jax.device_count() == 8


def test_fsdp_fill_takes_all_devices():
  mesh = create_mesh(_config(ici_fsdp_parallelism=-1))
  assert mesh.axis_names == BASE_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1, "autoregressive": 1}
  assert mesh.axis_types == (AxisType.Auto,) * 5


def test_data_by_tensor():
  mesh = create_mesh(
    _config(ici_data_parallelism=2, ici_fsdp_parallelism=1, ici_tensor_parallelism=4)
  )
  assert mesh.devices.shape == (2, 1, 1, 4, 1)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_data_fsdp_tensor():
  mesh = create_mesh(
    _config(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)
  )
  assert mesh.devices.shape == (2, 2, 1, 2, 1)


def test_fill_on_other_axis():
  mesh = create_mesh(
    _config(ici_fsdp_parallelism=1, ici_tensor_parallelism=-1, ici_data_parallelism=2)
  )
  assert mesh.shape["tensor"] == 4


def test_plain_mapping_config():
  mesh = create_mesh(
    {"mesh_axes": ["data", "tensor"], "ici_data_parallelism": 2, "ici_tensor_parallelism": -1}
  )
  assert dict(mesh.shape) == {"data": 2, "tensor": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_explicit_device_subset():
  devices = jax.devices()[:4]
  mesh = create_mesh(
    _config(("fsdp", "tensor"), ici_fsdp_parallelism=-1, ici_tensor_parallelism=2), devices=devices
  )
  assert dict(mesh.shape) == {"fsdp": 2, "tensor": 2}
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


def test_dcn_data_hybrid_layout():
  devices = jax.devices()
  mesh = create_mesh(_config(dcn_data_parallelism=2, ici_fsdp_parallelism=-1))
  assert mesh.devices.shape == (2, 4, 1, 1, 1)
  # dcn is outermost: each data index is one slice = one half of the device list.
  first = {d.id for d in mesh.devices[0].flat}
  second = {d.id for d in mesh.devices[1].flat}
  assert first == {d.id for d in devices[:4]}
  assert second == {d.id for d in devices[4:]}


def test_dcn_and_ici_on_same_axis_keeps_slices_contiguous():
  devices = jax.devices()
  mesh = create_mesh(
    _config(
      ("data", "tensor"), dcn_data_parallelism=2, ici_data_parallelism=2, ici_tensor_parallelism=2
    )
  )
  assert mesh.devices.shape == (4, 2)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # Rows 0-1 (dcn index 0) hold slice 0, rows 2-3 hold slice 1.
  assert set(ids[:2].flat) == {d.id for d in devices[:4]}
  assert set(ids[2:].flat) == {d.id for d in devices[4:]}


def test_dcn_fill_from_detected_slices():
  # One process and no slice_index on CPU: one slice, so dcn -1 becomes 1.
  mesh = create_mesh(_config(dcn_data_parallelism=-1, ici_fsdp_parallelism=-1))
  assert mesh.shape["data"] == 1 and mesh.shape["fsdp"] == 8


def test_bad_product_names_keys_and_numbers():
  with pytest.raises(ValueError, match=r"ici_tensor_parallelism=3.*8 devices"):
    create_mesh(_config(ici_fsdp_parallelism=1, ici_tensor_parallelism=3))


def test_fill_not_divisible():
  with pytest.raises(ValueError, match=r"ici_fsdp_parallelism=-1 cannot be filled"):
    create_mesh(_config(ici_fsdp_parallelism=-1, ici_tensor_parallelism=3))


def test_two_fills_rejected():
  with pytest.raises(ValueError, match=r"ici_fsdp_parallelism.*ici_tensor_parallelism"):
    create_mesh(_config(ici_fsdp_parallelism=-1, ici_tensor_parallelism=-1))


def test_slices_must_divide_devices():
  with pytest.raises(ValueError, match=r"dcn_data_parallelism=3"):
    create_mesh(_config(dcn_data_parallelism=3, ici_fsdp_parallelism=-1))


def test_invalid_size_rejected():
  with pytest.raises(ValueError, match=r"ici_data_parallelism"):
    create_mesh(_config(ici_data_parallelism=0, ici_fsdp_parallelism=-1))


def test_missing_mesh_axes():
  with pytest.raises(ValueError, match="mesh_axes"):
    create_mesh({"ici_fsdp_parallelism": -1})


def test_mesh_shape_string():
  mesh = create_mesh(_config(("data", "tensor"), ici_data_parallelism=2, ici_tensor_parallelism=4))
  assert mesh_shape_string(mesh) == "data=2 x tensor=4 (8 devices)"


def test_hybrid_layout_groups_by_process():
  # Two fake hosts whose devices are interleaved in the device list: with as
  # many processes as slices, a slice is one host, not a contiguous chunk.
  from meshattn.sharding.mesh import _hybrid_mesh

  fake = [types.SimpleNamespace(id=i, process_index=i % 2) for i in range(8)]
  arr = _hybrid_mesh([1, 4], [2, 1], fake)
  assert arr.shape == (2, 4)
  assert [d.id for d in arr[0]] == [0, 2, 4, 6]
  assert [d.id for d in arr[1]] == [1, 3, 5, 7]
