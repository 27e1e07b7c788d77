"""create_mesh on the 8 fake CPU devices that tests/conftest.py sets up."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from meshattn.sharding import create_mesh, device_groups, mesh_shape_string
from meshattn.sharding.mesh import mesh_devices

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
  with pytest.raises(ValueError, match=r"ici_fsdp_parallelism: -1 fill impossible.*not divisible"):
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


def _fake(n, process=lambda i: 0, slice_=None):
  """Fake devices: ids 0..n-1, process_index from `process`, slice_index from `slice_` (or none)."""
  devices = []
  for i in range(n):
    d = types.SimpleNamespace(id=i, process_index=process(i))
    if slice_ is not None:
      d.slice_index = slice_(i)
    devices.append(d)
  return devices


def _ids(array):
  return np.vectorize(lambda d: d.id)(array)


def test_slices_win_when_they_split_as_asked():
  # 4 hosts in 2 slices (TPU multislice): the dcn groups are the slices, not the hosts.
  fake = _fake(8, process=lambda i: i // 2, slice_=lambda i: i % 2)
  kind, groups = device_groups(fake, 2)
  assert kind == "slice"
  assert [[d.id for d in g] for g in groups] == [[0, 2, 4, 6], [1, 3, 5, 7]]
  _, arr = mesh_devices(_config(("data", "fsdp"), dcn_data_parallelism=2, ici_fsdp_parallelism=-1),
                        fake)
  assert _ids(arr).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_processes_when_every_device_reports_slice_zero():
  # GPU/CPU under jax.distributed: one "slice" (all 0), two hosts, devices interleaved in the list.
  fake = _fake(8, process=lambda i: i % 2, slice_=lambda i: 0)
  kind, groups = device_groups(fake, 2)
  assert kind == "process"
  _, arr = mesh_devices(
    _config(("data", "tensor"), dcn_data_parallelism=2, ici_data_parallelism=2,
            ici_tensor_parallelism=2), fake)
  # Rows 0-1 (dcn index 0) are host 0's devices, rows 2-3 host 1's.
  assert _ids(arr).tolist() == [[0, 2], [4, 6], [1, 3], [5, 7]]


def test_processes_on_the_fsdp_axis():
  fake = _fake(8, process=lambda i: i // 4, slice_=lambda i: 0)
  _, arr = mesh_devices(_config(("data", "fsdp", "tensor"), dcn_fsdp_parallelism=2,
                                ici_fsdp_parallelism=2, ici_tensor_parallelism=2), fake)
  assert arr.shape == (1, 4, 2)
  assert {d.process_index for d in arr[:, :2].flat} == {0}
  assert {d.process_index for d in arr[:, 2:].flat} == {1}


def test_processes_when_devices_have_no_slice_index():
  fake = _fake(8, process=lambda i: i // 4)
  kind, groups = device_groups(fake, 2)
  assert kind == "process" and [len(g) for g in groups] == [4, 4]


def test_dcn_fill_counts_processes_when_one_slice():
  fake = _fake(8, process=lambda i: i // 4, slice_=lambda i: 0)
  axes, arr = mesh_devices(_config(("data", "fsdp"), dcn_data_parallelism=-1,
                                   ici_fsdp_parallelism=-1), fake)
  assert arr.shape == (2, 4)
  fake = _fake(8, process=lambda i: i // 2, slice_=lambda i: i // 4)
  assert mesh_devices(_config(("data", "fsdp"), dcn_data_parallelism=-1,
                              ici_fsdp_parallelism=-1), fake)[1].shape == (2, 4)


def test_no_grouping_fits_names_what_was_tried():
  fake = _fake(8, process=lambda i: i // 4, slice_=lambda i: 0)
  with pytest.raises(ValueError, match=r"4 device groups.*slices: the devices report 1 slices, "
                     r"not 4; processes: the devices report 2 processes, not 4"):
    device_groups(fake, 4)


def test_unequal_hosts_rejected():
  fake = _fake(8, process=lambda i: 0 if i < 5 else 1, slice_=lambda i: 0)
  with pytest.raises(ValueError, match=r"processes: the processes hold unequal numbers .*\[5, 3\]"):
    device_groups(fake, 2)


def test_one_process_is_cut_into_blocks():
  # No slow network inside one process: contiguous blocks stand in for hosts.
  fake = _fake(8, slice_=lambda i: 0)
  kind, groups = device_groups(fake, 4)
  assert kind == "block" and [[d.id for d in g] for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  with pytest.raises(ValueError, match=r"3 does not divide 8 devices"):
    device_groups(fake, 3)


def test_matches_mesh_utils_for_process_granules():
  # mesh_utils.create_hybrid_device_mesh(process_is_granule=True) on the same (real) devices,
  # relabelled as two hosts through a wrapper that overrides process_index.
  from jax.experimental import mesh_utils

  class Host:
    def __init__(self, device, process):
      self._device, self.process_index = device, process

    def __getattr__(self, name):
      return getattr(self._device, name)

  fake = [Host(d, d.id % 2) for d in jax.devices()]
  want = mesh_utils.create_hybrid_device_mesh([2, 2], [2, 1], fake, process_is_granule=True)
  _, got = mesh_devices(_config(("data", "tensor"), dcn_data_parallelism=2, ici_data_parallelism=2,
                                ici_tensor_parallelism=2), fake)
  assert _ids(got).tolist() == _ids(want).tolist()
