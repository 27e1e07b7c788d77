"""tokamax's Mosaic GPU flash attention (Hopper / Blackwell) behind the reference signature.

tokamax (an optional extra: `pip install meshattn[tokamax]`, needs jax >= 0.9.2
and an sm90 / sm100 GPU) ships a warp-specialised Mosaic GPU kernel that
scripts/bench.py measured on an H100 (docs/benchmarks.md) against cuDNN in the
same run: faster forward (1.13x at b4 s4096), slower forward+backward (0.97x;
0.87x at b1 s16384), and it takes a logit soft cap, which cuDNN refuses (2.3x
the Pallas Triton kernel's forward there). The registry therefore ranks it
first for forward-only requests (serving prefill) and after cuDNN for
training, and uses it for soft cap; segment ids, sinks and chunked masks stay
with the Pallas GPU kernel.

What it serves: causal / full / left sliding window masks (index based, so
positions must be token indices), GQA / MQA without repeating K/V, soft cap,
gradients (tokamax's own Mosaic backward), fp16 / bf16 inputs, head_dim up to
256, lengths that are multiples of TOKAMAX_LENGTH_MULTIPLE (TOKAMAX_LIMITS: the registry
skips it for other lengths and tries the next `flash` variant, cuDNN or the Pallas GPU
kernel, or under autoselect any kernel that serves the call, so a registry choice never
fails on shape; called directly with such lengths it raises ValueError naming them).

Compatibility: tokamax 0.0.12 still passes `out_shape=` / `scratch_shapes=`
to `plgpu.kernel`, which JAX 0.11 renamed to `out_type=` / `scratch_types=`.
`_patch_tokamax_for_jax` gives tokamax's kernel modules (and only them) a view
of the Mosaic GPU module that accepts the old names; JAX's module is untouched.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import types

import jax

from meshattn.layers.kernels.api import TrainCall, train_kernel
from meshattn.layers.kernels.registry import GPU, HALF_DTYPES, Limits, Request, train_variant
from meshattn.layers.kernels.shared.gpu_probe import causal_attention_runs, gpu_probe_passes

logger = logging.getLogger("meshattn.kernels")

# Soft cap, no segments / sinks; fp16 / bf16 inputs only (no float32).
TOKAMAX_FEATURES = frozenset({"gqa", "causal", "full", "window", "soft_cap", "backward"})
# tokamax 0.0.12's Mosaic kernel refuses lengths that are not a multiple of 8,
# and window masks unless the length is a multiple of its 128-row tile
# (checked on the H100).
TOKAMAX_LENGTH_MULTIPLE = 128


def _length_problem(q_len: int | None, kv_len: int | None) -> str | None:
  """Why tokamax cannot tile these lengths (None: it can, or they are not known)."""
  bad = [f"{name} {n}" for name, n in (("q_len", q_len), ("kv_len", kv_len))
         if n is not None and n % TOKAMAX_LENGTH_MULTIPLE]
  return f"{' and '.join(bad)} not a multiple of {TOKAMAX_LENGTH_MULTIPLE}" if bad else None


# tokamax pads head_dim to 64 itself; 256 is the widest its Mosaic kernel ran at (H200, forward
# and backward, 2026-12-04).
TOKAMAX_LIMITS = Limits(GPU, max_head_dim=256, dtypes=HALF_DTYPES,
                        fits=lambda request: _length_problem(request.q_len, request.kv_len),
                        why="tokamax's Mosaic GPU kernel")
# tokamax modules that call plgpu.kernel for attention (forward and backward, sm90 and sm100).
_KERNEL_MODULES = (
    "tokamax._src.ops.attention.pallas_mosaic_gpu_kernel_sm90",
    "tokamax._src.ops.attention.pallas_mosaic_gpu_kernel_sm100",
    "tokamax._src.ops.attention.pallas_mosaic_gpu_vjp_kernel_sm90",
    "tokamax._src.ops.attention.pallas_mosaic_gpu_vjp_kernel_sm100",
)


class _RenamedKernelArgs(types.ModuleType):
  """The Mosaic GPU Pallas module, with `kernel` accepting the pre-0.11 argument names."""

  def __init__(self, module):
    super().__init__(module.__name__)
    self._module = module

  def __getattr__(self, name):
    return getattr(self._module, name)

  def kernel(self, *args, out_shape=None, scratch_shapes=None, **kwargs):
    if out_shape is not None:
      kwargs["out_type"] = out_shape
    if scratch_shapes is not None:
      kwargs["scratch_types"] = scratch_shapes
    return self._module.kernel(*args, **kwargs)


def _patch_tokamax_for_jax() -> None:
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  if "out_shape" in inspect.signature(plgpu.kernel).parameters:
    return  # this JAX still takes the names tokamax uses
  view = _RenamedKernelArgs(plgpu)
  for name in _KERNEL_MODULES:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    if getattr(module, "plgpu", None) is plgpu:
      module.plgpu = view


@functools.cache
def _tokamax():
  """The tokamax module, patched for this JAX, or None when it is not installed."""
  _absl_flags_as_library()
  try:
    tokamax = importlib.import_module("tokamax")
  except Exception as error:  # pylint: disable=broad-except  # absent, or built for another JAX
    logger.info("tokamax not usable (%s: %s); flash on GPU uses cuDNN / Pallas",
                type(error).__name__, error)
    return None
  _patch_tokamax_for_jax()
  return tokamax


def _absl_flags_as_library() -> None:
  """tokamax reads absl flags, which parse sys.argv on first access and fail on
  the host program's own options (`--check` -> UnrecognizedFlagError). A
  program that did not parse absl flags itself gets their defaults instead."""
  try:
    from absl import flags  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@functools.cache
def tokamax_available() -> bool:
  """Whether tokamax is installed and its Mosaic kernel runs here (Hopper or newer; cached)."""
  tokamax = _tokamax()
  if tokamax is None:
    return False
  return gpu_probe_passes(
      causal_attention_runs(functools.partial(tokamax.dot_product_attention,
                                              implementation="mosaic")),
      min_capability=9.0,
      warning="tokamax is installed but its Mosaic kernel failed here (%s: %s); flash on "
              "GPU uses cuDNN / Pallas")


def _rank(request: Request) -> int:
  # H100 bf16, same run (docs/benchmarks.md): tokamax's forward is 1.13x
  # cuDNN's (rank 2), its forward+backward 0.87-0.97x: first for forward-only
  # requests, else after cuDNN and before Pallas Triton (rank 0).
  # Above head_dim 128 its backward is slow: H200, h256 soft cap, fwd+bwd
  # 16.2 ms against the Pallas kernel's 11.7 (2026-12-04): after Pallas there.
  if "backward" not in request.features:
    return 3
  return -1 if request.head_dim and request.head_dim > 128 else 1


# Whether it is available is looked up when asked.
@train_variant("flash", GPU, TOKAMAX_FEATURES, "tokamax Mosaic GPU", rank=_rank,
               limits=TOKAMAX_LIMITS, available=lambda: tokamax_available())
@train_kernel("tokamax_attention", TOKAMAX_FEATURES, index_masked=True, no_empty_rows=True,
              half_precision=True)
def tokamax_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      call: TrainCall) -> tuple[jax.Array, None]:
  """tokamax Mosaic GPU attention of query [B, T, N, H] over key/value [B, S, K, H].

  Same arguments and results as `dot_product_attention` (weights are always
  None). Features outside TOKAMAX_FEATURES, float32 inputs, lengths it cannot tile
  (TOKAMAX_LIMITS; the registry never sends them) or a missing tokamax raise
  ValueError naming them, before any GPU work.
  """
  problem = _length_problem(query.shape[1], key.shape[1])
  if problem:
    raise ValueError(f"tokamax_attention: {problem} (select 'flash' through the registry, "
                     "which serves such lengths with another variant)")
  tokamax = _tokamax()
  if tokamax is None:
    raise ValueError("tokamax_attention needs the tokamax package (pip install meshattn[tokamax])")

  spec = call.options.mask
  window = (spec.window - 1, 0) if spec.window else None
  context = tokamax.dot_product_attention(
      query, key, value, scale=call.options.scale, is_causal=spec.is_causal,
      local_window_size=window, logits_soft_cap=call.options.soft_cap or None,
      implementation="mosaic")  # [B, T, N, H]
  return context, None

