"""The kernel registry: which kernel serves which request.

Each kernel variant declares its platforms, the modes it serves, the
features it implements and what shapes it can run (Limits: head dims,
dtypes, the shared memory of its tiles). A request names a platform, a mode,
the features a call needs and, where known, its head_dim and dtype. An
explicitly named kernel that cannot serve the request raises ValueError
naming the missing features or the limit, and the kernels that could; only
`autoselected` chooses, it picks the fastest registered kernel that supports
everything asked (never dropping a mask, window, soft cap or segment ids)
and can run the shape, and logs its choice and the variants it skipped.

Config keys: `attention` picks the train-mode kernel, `decode_attention` the
autoregressive one. Prefill of a prompt on empty slots runs the `attention`
kernel as in train mode (a request without "backward") over the prompt, then
writes the cache; prefill that continues non-empty slots (and later chunks of
a chunked prefill) runs the split path on a GPU where it is exact
(layers/prefill_split.py: two cuDNN passes merged), else a tiled train kernel
over the whole slot under an explicit mask (layers/prefill_attention.py), else
the reference cached path, which also attends over what the cache holds.

Each kernel module registers its own variants beside the function: `train_variant` /
`decode_variant`, or `register(Kernel(...))` for a row whose function lives elsewhere (the
reference cached step). Importing the registry imports every module of kernels/train and
kernels/decode (`_discover`), so a new kernel is its file and its test: no list names it.
Kernel modules import their Pallas backend on first use (shared/lazy_import.py), which keeps
that cheap on any host. Variants of one name are tried by their `rank`, never in the order
they were found.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import pkgutil
from typing import Callable, Iterable, TypeVar

import jax
import jax.numpy as jnp

from meshattn.configs.vocabulary import (  # noqa: F401  (re-exported)
    DECODE_KERNELS, FEATURES, PLATFORMS, TRAIN_KERNELS)

logger = logging.getLogger("meshattn.kernels")

# Platform sets and input dtypes the kernel modules' registrations name.
ALL = frozenset(PLATFORMS)
GPU, TPU = frozenset({"gpu"}), frozenset({"tpu"})
HALF_DTYPES = frozenset({"bfloat16", "float16"})
# The registry's column for float32 inputs: a dtype the kernel accepts, not a feature a call
# asks for, so the modules' own feature sets (what their call checks compare) leave it out.
FLOAT32 = frozenset({"float32"})


@dataclasses.dataclass(frozen=True)
class Request:
  """What a call needs: platform in PLATFORMS, mode, and feature names from FEATURES; and,
  where the caller knows them, the head_dim and the dtype of the activations (a dtype name or
  object), which kernels' Limits are checked against (None: not checked)."""

  platform: str
  mode: str
  features: frozenset[str]
  head_dim: int | None = None
  dtype: str | None = None
  q_len: int | None = None  # query and key lengths of the call, where known
  kv_len: int | None = None  # (a decode step: the cache's capacity per slot)
  # A decode step over a cache, where known: the dtype it stores, its kv_quant_axis, and the
  # query heads per kv head.
  kv_dtype: str | None = None
  kv_quant_axis: str | None = None
  group: int | None = None

  def __post_init__(self):
    unknown = set(self.features) - set(FEATURES)
    if unknown:
      raise ValueError(f"unknown attention features {sorted(unknown)}; known: {FEATURES}")
    if self.head_dim is not None and (isinstance(self.head_dim, bool)
                                      or not isinstance(self.head_dim, int) or self.head_dim < 1):
      raise ValueError(f"head_dim must be a positive int or None, got {self.head_dim!r}")
    for name in ("dtype", "kv_dtype"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)  # "bfloat16", ...

  @property
  def input_dtype(self) -> str | None:
    """The dtype, or float32 where only the "float32" feature says so."""
    return self.dtype or ("float32" if "float32" in self.features else None)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a kernel variant can run besides its features, on `platforms` (None: all of its
  own): head dims, input dtypes, and `fits`, which says why a request's shape cannot run
  (e.g. the shared memory of its tiles) or None. A request without head_dim / dtype skips
  those checks."""

  platforms: frozenset[str] | None = None
  min_head_dim: int = 1
  max_head_dim: int | None = None
  head_dim_multiple: int = 1
  head_dim_power_of_two: bool = False
  dtypes: frozenset[str] | None = None  # None: whatever its features accept
  fits: Callable[[Request], str | None] | None = None
  why: str = ""  # where the numbers come from (shown in errors)

  def head_dims(self) -> str:
    """The head dims it runs, in words."""
    words = ["a power of two"] if self.head_dim_power_of_two else []
    if self.head_dim_multiple > 1:
      words.append(f"a multiple of {self.head_dim_multiple}")
    if self.min_head_dim > 1:
      words.append(f">= {self.min_head_dim}")
    if self.max_head_dim is not None:
      words.append(f"<= {self.max_head_dim}")
    return ", ".join(words) or "any"

  def violations(self, request: Request) -> list[str]:
    """Why this request cannot run here (empty: it can)."""
    if self.platforms is not None and request.platform not in self.platforms:
      return []
    out = []
    h = request.head_dim
    if h is not None and (
        h < self.min_head_dim or (self.max_head_dim is not None and h > self.max_head_dim)
        or h % self.head_dim_multiple or (self.head_dim_power_of_two and h & (h - 1))):
      out.append(f"head_dim {h} (runs {self.head_dims()})")
    dtype = request.input_dtype
    if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
      out.append(f"dtype {dtype} (runs {sorted(self.dtypes)})")
    if not out and self.fits is not None:
      reason = self.fits(request)
      if reason:
        out.append(reason)
    if out and self.why:
      out[-1] += f"; {self.why}"
    return out


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel variant. `impl` is 'module:function', imported on first use so
  that Pallas / cuDNN code is only loaded where it runs."""

  name: str
  platforms: frozenset[str]
  modes: frozenset[str]
  features: frozenset[str]
  impl: str
  description: str
  available: Callable[[], bool] | None = None
  # Features the request must have (the paged kernel reads only a paged cache).
  requires: frozenset[str] = frozenset()
  # Variants of one name are tried by rank, higher first: a number, or a function of the
  # request where measured speed differs by request, e.g. forward-only vs forward+backward
  # (scripts/bench.py, docs/benchmarks.md). Variants that can serve one request never tie.
  rank: int | Callable[[Request], int] = 0
  # Masks from token indices inside the call, not from the positions it is
  # given (flash kernels): under shard_map the query length must stay whole.
  masks_by_index: bool = False
  # Ring attention: under shard_map K/V stay split over the length axes like
  # the queries, and the kernel passes them around (takes `axis_name`).
  ring: bool = False
  # Head dims, dtypes and tile memory it runs (checked before it is chosen).
  limits: Limits = Limits()
  # Which call it takes (kernels/api.py): "train" (Q/K/V and the train keywords), "decode"
  # (one query per row over a cache's view) or "cached" (the reference cached step, which
  # reads the cache block by block itself).
  protocol: str = "train"
  # Takes `interpret=True`: a Pallas kernel that runs in TPU interpret mode on this host
  # (settings.pallas_interpret, CPU tests).
  interpretable: bool = False
  # Forms the whole [B, N, T, S] logits (the reference einsum): fine for training's own
  # lengths, not for attending a chunk over a whole cache slot (prefill_attention).
  materializes_logits: bool = False
  # Keyword arguments bound when loaded (one function serving two platforms: `backend`).
  bind: tuple[tuple[str, object], ...] = ()
  # Its tile-size keywords that take any positive size (a user's block size, e.g. attnax's
  # attention_block_size, is passed to these); () where tiles are tuned or constrained.
  block_keywords: tuple[str, ...] = ()

  @property
  def length_layout(self) -> str:
    """How shard_map splits the sequence for this kernel: "whole" (the query length stays on
    every shard), "ring" (queries and K/V split, rotated by the kernel) or "split" (queries
    split, K/V gathered)."""
    return "whole" if self.masks_by_index else "ring" if self.ring else "split"

  def rank_for(self, request: Request) -> int:
    return self.rank(request) if callable(self.rank) else self.rank

  def missing(self, request: Request) -> set[str]:
    return set(request.features) - set(self.features)

  def serves(self, request: Request) -> bool:
    return (request.platform in self.platforms and request.mode in self.modes
            and not self.missing(request) and self.requires <= request.features
            and not self.limits.violations(request)
            and (self.available is None or self.available()))

  def load(self) -> Callable:
    module, _, function = self.impl.partition(":")
    fn = getattr(importlib.import_module(module), function)
    return functools.partial(fn, **dict(self.bind)) if self.bind else fn


def _ordered(variants: list[Kernel], request: Request) -> list[Kernel]:
  """Variants in the order they are tried: by rank, higher first."""
  return sorted(variants, key=lambda k: -k.rank_for(request))


_REGISTRY: list[Kernel] = []

# Autoselect preference, fastest first, per (platform, mode). Measured on GPU
# by scripts/bench.py (docs/benchmarks.md); on CPU the plain kernels win.
AUTOSELECT_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("gpu", "train"): ("flash", "blockwise", "dot_product"),
    ("tpu", "train"): ("flash", "blockwise", "dot_product"),
    ("cpu", "train"): ("dot_product", "blockwise"),
    ("gpu", "autoregressive"): ("paged", "ragged", "dot_product"),
    ("tpu", "autoregressive"): ("paged", "ragged", "dot_product"),
    ("cpu", "autoregressive"): ("dot_product", "ragged", "paged"),
    ("gpu", "prefill"): ("dot_product",),
    ("tpu", "prefill"): ("dot_product",),
    ("cpu", "prefill"): ("dot_product",),
}


def _listing_key(kernel: Kernel) -> tuple:
  """The order `kernels()` and errors list variants in (the tables: by name and platforms,
  then this order), whatever order the modules were found in: by name, train rows first,
  then by rank for a typical request (in train mode: with backward), as a request tries
  them."""
  platform, mode = min(kernel.platforms), min(kernel.modes)
  typical = Request(platform, mode, frozenset({"backward"} if mode == "train" else ()))
  return kernel.name, "train" not in kernel.modes, -kernel.rank_for(typical)


def register(kernel: Kernel) -> Kernel:
  """Add a kernel variant; a name may have several per platform (tried by rank, e.g. GPU
  flash: cuDNN, then tokamax, then the Pallas kernel for what neither can express).
  Re-registering the same implementation (name, function, platforms) replaces it."""
  same = lambda k: (k.name, k.impl, k.platforms) == (kernel.name, kernel.impl, kernel.platforms)
  _REGISTRY[:] = sorted([k for k in _REGISTRY if not same(k)] + [kernel], key=_listing_key)
  return kernel


_Fn = TypeVar("_Fn", bound=Callable)


def _variant(name: str, platforms: Iterable[str], modes: Iterable[str], features: Iterable[str],
             description: str, **fields) -> Callable[[_Fn], _Fn]:
  def wrap(fn: _Fn) -> _Fn:
    register(Kernel(name, frozenset(platforms), frozenset(modes), frozenset(features),
                    f"{fn.__module__}:{fn.__name__}", description, **fields))
    return fn

  return wrap


def train_variant(name: str, platforms: Iterable[str], features: Iterable[str], description: str,
                  **fields) -> Callable[[_Fn], _Fn]:
  """Registers the decorated train kernel (an `api.train_kernel`) as a variant of `name` for
  train mode, with `fields` of `Kernel`. Its train_kernel's `index_masked` says whether it
  masks by token index (`masks_by_index`: whole query rows under shard_map)."""

  def wrap(fn: _Fn) -> _Fn:
    by_index = getattr(fn, "index_masked", False) is not False
    return _variant(name, platforms, {"train"}, features, description, masks_by_index=by_index,
                    **fields)(fn)

  return wrap


def decode_variant(name: str, platforms: Iterable[str], features: Iterable[str],
                   description: str, **fields) -> Callable[[_Fn], _Fn]:
  """Registers the decorated decode-protocol function (kernels/api.py) as a variant of
  `name` for autoregressive steps, with `fields` of `Kernel`."""
  return _variant(name, platforms, {"autoregressive"}, features, description, protocol="decode",
                  **fields)


def kernels(name: str | None = None) -> list[Kernel]:
  return [k for k in _REGISTRY if name is None or k.name == name]


def current_platform() -> str:
  return jax.default_backend() if jax.default_backend() in PLATFORMS else "cpu"


@functools.cache
def gpu_capability() -> float | None:
  """The default GPU's compute capability, None without a GPU (then Hopper is assumed)."""
  try:
    return float(getattr(jax.devices("gpu")[0], "compute_capability", "nan"))
  except (RuntimeError, ValueError):
    return None


def select(name: str, request: Request) -> Kernel:
  """The kernel variant that serves `request`: the named one, or the fastest
  that supports everything when name == 'autoselected'."""
  if name == "autoselected":
    order = AUTOSELECT_ORDER.get((request.platform, request.mode), ())
    for candidate in order:
      for kernel in _ordered(kernels(candidate), request):
        limited = kernel.limits.violations(request)
        if limited and request.platform in kernel.platforms and not kernel.missing(request):
          logger.info("autoselect skips %r (%s): cannot run %s", kernel.name, kernel.description,
                      "; ".join(limited))
        if kernel.serves(request):
          logger.info("autoselected kernel %r (%s) for %s/%s with %s", kernel.name,
                      kernel.description, request.platform, request.mode, sorted(request.features))
          return kernel
    raise ValueError(f"no registered kernel serves {request.mode} on {request.platform} with "
                     f"features {sorted(request.features)}")
  variants = [k for k in kernels(name) if request.platform in k.platforms]
  if not kernels(name):
    known = sorted({k.name for k in _REGISTRY} | {"autoselected"})
    raise ValueError(f"attention kernel {name!r} is unknown; allowed: {known}")
  if not variants:
    platforms = sorted({p for k in kernels(name) for p in k.platforms})
    raise ValueError(f"attention kernel {name!r} does not run on {request.platform} (only on "
                     f"{platforms}); kernels for {request.platform}: {_names_serving(request)}")
  in_mode = [k for k in variants if request.mode in k.modes]
  if not in_mode:
    modes = sorted({m for k in variants for m in k.modes})
    raise ValueError(f"attention kernel {name!r} does not serve model_mode={request.mode!r} (only "
                     f"{modes}); kernels that do: {_names_serving(request)}")
  for kernel in _ordered(in_mode, request):
    if kernel.serves(request):
      return kernel
  serving = _names_serving(request)
  missing_everywhere = set.intersection(*(kernel.missing(request) for kernel in in_mode))
  if missing_everywhere:
    raise ValueError(
        f"attention kernel {name!r} on {request.platform} does not support "
        f"{sorted(missing_everywhere)}; kernels that support this request: {serving}")
  for kernel in in_mode:
    if not kernel.missing(request) and not kernel.requires <= request.features:
      raise ValueError(f"attention kernel {name!r} needs {sorted(kernel.requires - request.features)} "
                       f"(e.g. a paged KV cache); kernels that serve this request: {serving}")
  lacking = "; ".join(f"{k.description} lacks {sorted(k.missing(request))}" for k in in_mode
                      if k.missing(request))
  limited = [f"{k.description} cannot run {'; '.join(k.limits.violations(request))}"
             for k in in_mode if not k.missing(request) and k.limits.violations(request)]
  if limited:
    raise ValueError(f"attention kernel {name!r} on {request.platform} cannot run this request: "
                     f"{'; '.join(limited + ([lacking] if lacking else []))}; kernels that can: "
                     f"{serving}")
  if lacking:
    raise ValueError(f"no variant of attention kernel {name!r} on {request.platform} supports all of "
                     f"{sorted(request.features)} ({lacking}); kernels that do: {serving}")
  raise ValueError(f"attention kernel {name!r} is not available on this {request.platform} "
                   f"machine; kernels that are: {serving}")


def _names_serving(request: Request) -> list[str]:
  return sorted({k.name for k in _REGISTRY if k.serves(request)})


def feature_table_markdown(platforms: Iterable[str] = PLATFORMS) -> str:
  """The kernels x features table of docs/kernels.md, generated from the registry."""
  rows = sorted(_REGISTRY, key=lambda k: (k.name, sorted(k.platforms)))
  header = "| kernel | platforms | modes | " + " | ".join(FEATURES) + " |"
  lines = [header, "| " + " | ".join(["---"] * (3 + len(FEATURES))) + " |"]
  for k in rows:
    cells = ["yes" if f in k.features else "" for f in FEATURES]
    lines.append(f"| {k.name} ({k.description}) | {', '.join(sorted(k.platforms))} | "
                 f"{', '.join(sorted(k.modes))} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def limits_table_markdown() -> str:
  """The kernels with shape limits: where they hold, head dims, dtypes, why (for the docs)."""
  lines = ["| kernel | where | head_dim | dtypes | why |", "| --- | --- | --- | --- | --- |"]
  for k in sorted(_REGISTRY, key=lambda k: (k.name, sorted(k.platforms))):
    lim = k.limits
    if lim != Limits():
      where = ", ".join(sorted(lim.platforms or k.platforms))
      dtypes = ", ".join(sorted(lim.dtypes)) if lim.dtypes else "any"
      lines.append(f"| {k.name} ({k.description}) | {where} | {lim.head_dims()} | {dtypes} | "
                   f"{lim.why} |")
  return "\n".join(lines)


def _discover() -> None:
  """Imports every module of kernels/train and kernels/decode: each registers its variants."""
  for package_name in ("train", "decode"):
    package = importlib.import_module(f"meshattn.layers.kernels.{package_name}")
    for module in pkgutil.iter_modules(package.__path__):
      importlib.import_module(f"{package.__name__}.{module.name}")


_discover()

if __name__ == "__main__":
  # The imported module, not __main__: the kernel modules registered there.
  from meshattn.layers.kernels import registry as _registry  # pylint: disable=import-self
  print(_registry.feature_table_markdown())
  print()
  print(_registry.limits_table_markdown())
