"""Availability probes run concretely even when first asked inside a traced step, and
on this process's own GPU (layers/kernels/shared/gpu_probe.py)."""

import logging

import jax
import jax.numpy as jnp
import pytest

from meshattn.layers.kernels.shared import gpu_probe
from meshattn.layers.kernels.shared.gpu_probe import local_gpu, run_probe
from meshattn.layers.kernels.train import flash_gpu, flash_tokamax


def _failing_at_run_time(device):
  """Fails only when executed (a NaN check on a computed value), like a kernel that
  compiles but breaks when it runs."""
  y = jax.jit(lambda x: x / 0.0)(jax.device_put(jnp.zeros(()), device))
  if not bool(jnp.isfinite(y)):
    raise RuntimeError("the probe ran and failed")
  return True


def test_a_probe_inside_a_trace_runs_now_and_sees_run_time_failures():
  device = jax.devices()[0]
  seen = []

  def traced(x):
    seen.append(run_probe(lambda d: float(jax.jit(lambda v: v * 2)(jax.device_put(
        jnp.ones(()), d))), device))
    with pytest.raises(RuntimeError, match="ran and failed"):
      run_probe(_failing_at_run_time, device)
    return x

  jax.jit(traced)(jnp.ones(2))
  assert seen == [2.0]


def test_local_gpu_is_none_without_a_gpu_and_local_with_one():
  device = local_gpu()
  if jax.default_backend() != "gpu":
    assert device is None
  else:
    assert device.process_index == jax.process_index()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="probes a GPU kernel")
@pytest.mark.parametrize("check", [flash_gpu.cudnn_available, flash_tokamax.tokamax_available])
def test_gpu_availability_first_asked_inside_a_trace_matches_asked_outside(check):
  check.cache_clear()
  seen = []
  jax.jit(lambda x: (seen.append(check()), x)[1])(jnp.ones(2))
  check.cache_clear()
  assert seen == [check()]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="probes a GPU kernel")
def test_installed_tokamax_passes_its_probe_on_hopper_even_inside_a_trace():
  """Its Mosaic kernel binds named axes: a probe evaluated op by op (as jax 0.11 does a jitted
  call under ensure_compile_time_eval) failed "unbound axis name: q_tiles", so flash lost
  its fastest GPU kernel on the H200."""
  pytest.importorskip("tokamax")
  if float(local_gpu().compute_capability) < 9.0:
    pytest.skip("tokamax's Mosaic kernel needs Hopper or newer")
  flash_tokamax.tokamax_available.cache_clear()
  seen = []
  jax.jit(lambda x: (seen.append(flash_tokamax.tokamax_available()), x)[1])(jnp.ones(2))
  assert seen == [True]


def test_gpu_probe_passes_runs_concretely_and_turns_failures_into_false(monkeypatch, caplog):
  """The shared availability check, on a CPU device standing in for this process's GPU."""
  monkeypatch.setattr(gpu_probe, "local_gpu", lambda: jax.devices()[0])
  seen = []

  def traced(x):
    seen.append(gpu_probe.gpu_probe_passes(lambda d: float(jax.jit(lambda v: v * 2)(
        jax.device_put(jnp.ones(()), d))) == 2.0))
    with caplog.at_level(logging.WARNING, logger="meshattn.kernels"):
      seen.append(gpu_probe.gpu_probe_passes(_failing_at_run_time, warning="probe broke (%s: %s)"))
    seen.append(gpu_probe.gpu_probe_passes(lambda d: False))
    return x

  jax.jit(traced)(jnp.ones(2))
  assert seen == [True, False, False]
  assert "probe broke (RuntimeError: the probe ran and failed)" in caplog.text
  # A device below min_capability (a CPU has none) is refused before the probe runs.
  assert not gpu_probe.gpu_probe_passes(_never_called, min_capability=9.0)


def _never_called(device):
  raise AssertionError("the probe ran on a device below min_capability")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the answer without a GPU")
def test_gpu_probe_passes_is_false_without_a_gpu_and_runs_nothing():
  assert not gpu_probe.gpu_probe_passes(_never_called)
  assert not flash_gpu.cudnn_available()
