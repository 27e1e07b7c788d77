"""Test set-up shared by every test folder.

The suite runs on CPU with 8 fake host devices so that sharding is exercised
without accelerators; the flag must be set before JAX initialises its backend.
Its shapes are tiny, so its time is XLA's CPU compiles. With LLVM's
optimisations off they take about a third less (measured 2026-11-30: 113 s ->
77 s for two test files); with XLA's classic loop emitters instead of the MLIR
fusion emitters (`xla_cpu_use_fusion_emitters=false`) and one LLVM module per
program (`xla_cpu_parallel_codegen_split_count=1`) about a fifth of that again
(measured 2026-12-04: 12 train / prefill / decode programs 7.0 s -> 1.4 s of
CPU; the whole suite 1110 -> 568 CPU-s, every test passing). The programs
compute the same HLO; only the host code generated for it differs. `make test`
relies on these flags (an XLA_FLAGS already set is kept).

XLA aborts the process on a flag it does not know, and jaxlib 0.11 (the GPU
machine's) no longer has `xla_cpu_use_fusion_emitters` (checked 2026-12-04: every
pytest worker died at start), so that one is set only for older jaxlibs.
"""

import importlib.metadata
import os
import re
import sys


def _suite_xla_flags() -> str:
  flags = ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
           "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_parallel_codegen_split_count=1"]
  # "0.10.2", "0.11.0rc1", "0.11.dev20261201": the leading major.minor.
  major_minor = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("jaxlib"))
  jaxlib = tuple(int(part) for part in major_minor.groups())
  if jaxlib < (0, 11):
    flags.append("--xla_cpu_use_fusion_emitters=false")
  return " ".join(flags)


os.environ.setdefault("XLA_FLAGS", _suite_xla_flags())
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Shared helpers (tests/helpers/...) are imported as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def float32_matmuls_are_float32():
  """Exact float32 products on every backend. The suite compares float32 kernels with float64
  NumPy at 1e-5..1e-6; a GPU's default float32 matmul is TF32-class (~1e-3), which would fail
  those comparisons for the precision's sake, not the kernel's. On CPU this changes nothing."""
  with jax.default_matmul_precision("highest"):
    yield
