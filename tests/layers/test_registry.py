"""The kernel registry: explicit choices that cannot serve a request raise with
the documented message, autoselect never loses a feature, its choice per
platform is pinned, the README's table is the registry's, and every kernel
module registers itself, from the feature constant it declares once."""

import dataclasses
import importlib
import inspect
import os
import pathlib
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from meshattn.layers import Attention
from meshattn.kvcache.views import ContiguousView, PagedView
from meshattn.layers.kernels import decode as kernels_decode
from meshattn.layers.kernels import registry
from meshattn.layers.kernels import train as kernels_train
from meshattn.layers.kernels.registry import FEATURES, Request, select

README = pathlib.Path(__file__).resolve().parents[2] / "docs" / "kernels.md"  # the kernels page
MASK_FEATURES = ("causal", "full", "window", "chunk")


@pytest.fixture(autouse=True)
def fake_cudnn(monkeypatch):
  """Selection on 'gpu' is decided as if cuDNN were present (no GPU here)."""
  for kernel in list(registry._REGISTRY):
    if kernel.available is not None:
      monkeypatch.setattr(registry, "_REGISTRY", [
          k if k is not kernel else registry.Kernel(**{**k.__dict__, "available": lambda: True})
          for k in registry._REGISTRY])


def every_unsupported_pair():
  """(name, platform, mode, feature) where no variant of the kernel has the feature."""
  seen = set()
  for kernel in registry.kernels():
    for platform in sorted(kernel.platforms):
      for mode in sorted(kernel.modes):
        variants = [k for k in registry.kernels(kernel.name)
                    if platform in k.platforms and mode in k.modes]
        for feature in FEATURES:
          case = (kernel.name, platform, mode, feature)
          if case not in seen and all(feature not in k.features for k in variants):
            seen.add(case)
            yield case


@pytest.mark.parametrize("name, platform, mode, feature", list(every_unsupported_pair()))
def test_explicit_kernel_rejects_every_unsupported_feature(name, platform, mode, feature):
  base = {"causal"} if feature not in MASK_FEATURES else set()
  base |= registry.kernels(name)[0].requires if name == "paged" else set()
  request = Request(platform, mode, frozenset(base | {feature}))
  with pytest.raises(ValueError, match=rf"{name}.*does not support \['{feature}'\]; kernels that support"):
    select(name, request)


def test_mode_and_platform_errors():
  with pytest.raises(ValueError, match="does not serve model_mode='train'.*dot_product"):
    select("ragged", Request("cpu", "train", frozenset({"causal"})))
  with pytest.raises(ValueError, match="does not run on cpu"):
    select("flash", Request("cpu", "train", frozenset({"causal"})))
  with pytest.raises(ValueError, match=r"needs \['paged_kv'\]"):
    select("paged", Request("gpu", "autoregressive", frozenset({"causal"})))
  with pytest.raises(ValueError, match="unknown; allowed"):
    select("splashy", Request("cpu", "train", frozenset()))


@pytest.mark.parametrize("platform, mode, features, expected", [
    ("cpu", "train", {"causal"}, "dot_product"),
    ("cpu", "train", {"causal", "dropout"}, "dot_product"),
    ("tpu", "train", {"causal", "gqa", "segment_ids", "soft_cap", "sinks", "backward"}, "flash"),
    ("tpu", "train", {"causal", "score_mod", "backward"}, "blockwise"),
    ("gpu", "train", {"causal", "backward", "float32"}, "flash"),
    ("gpu", "train", {"causal", "gqa", "backward"}, "flash"),
    ("gpu", "train", {"window", "gqa", "backward"}, "flash"),
    ("gpu", "train", {"causal", "segment_ids", "backward"}, "flash"),
    ("gpu", "train", {"causal", "soft_cap", "sinks", "backward"}, "flash"),
    ("gpu", "train", {"causal", "score_mod", "backward"}, "blockwise"),
    ("gpu", "train", {"causal", "dropout", "backward"}, "dot_product"),
    ("gpu", "autoregressive", {"causal", "gqa"}, "ragged"),
    ("gpu", "autoregressive", {"causal", "gqa", "paged_kv"}, "paged"),
    ("gpu", "autoregressive", {"chunk"}, "dot_product"),
    ("cpu", "autoregressive", {"causal", "paged_kv"}, "dot_product"),
    ("tpu", "prefill", {"causal", "quantized_kv"}, "dot_product"),
])
def test_autoselect_choice_per_platform(platform, mode, features, expected):
  assert select("autoselected", Request(platform, mode, frozenset(features))).name == expected


@settings(max_examples=150, deadline=None, derandomize=True)
@given(platform=st.sampled_from(registry.PLATFORMS),
       mode=st.sampled_from(["train", "prefill", "autoregressive"]),
       mask=st.sampled_from(MASK_FEATURES),
       extra=st.sets(st.sampled_from([f for f in FEATURES if f not in MASK_FEATURES])))
def test_autoselect_never_loses_a_feature(platform, mode, mask, extra):
  request = Request(platform, mode, frozenset({mask} | extra))
  try:
    kernel = select("autoselected", request)
  except ValueError as error:
    # Only when no kernel at all supports it; then nothing was silently dropped.
    assert not any(k.serves(request) for k in registry.kernels()), error
    return
  assert request.features <= kernel.features
  assert platform in kernel.platforms and mode in kernel.modes


def test_readme_table_is_generated_from_the_registry():
  """The one copy of the table is the README's; docs/kernels.md links to it."""
  table = registry.feature_table_markdown()
  assert table in (README.parents[1] / "README.md").read_text()  # the front door
  assert "README.md#kernels" in README.read_text()  # docs/kernels.md points there


def test_layer_refuses_an_explicit_kernel_missing_a_feature():
  model = Attention(rngs=nnx.Rngs(params=0, dropout=1), emb_dim=16, num_query_heads=2,
                    attention="blockwise", dropout_rate=0.1)
  with pytest.raises(ValueError, match=r"blockwise.*\['dropout'\]"):
    model(jnp.ones((1, 4, 16)), deterministic=False)
  with pytest.raises(ValueError, match="decode_attention"):
    Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=2, attention="ragged")
  with pytest.raises(ValueError, match="decode_attention"):
    Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=2, decode_attention="flash")


@pytest.mark.parametrize("module, constant, checked", [
    ("train.flash_tpu", "SPLASH_FEATURES", True),
    ("train.flash_gpu", "CUDNN_FEATURES", True),
    ("train.flash_tokamax", "TOKAMAX_FEATURES", True),
    ("train.flash_pallas_gpu", "PALLAS_GPU_FLASH_FEATURES", True),
    ("train.blockwise", "BLOCKWISE_FEATURES", True),
    ("train.ring", "RING_FEATURES", False),  # the ring kernel refuses the rest itself
    ("decode.ragged", "RAGGED_FEATURES", False),
    ("decode.paged", "PAGED_FEATURES", False),
    ("decode.decode_int8_mgpu", "INT8_MGPU_FEATURES", False),
])
def test_registered_features_are_each_kernel_modules_constant(module, constant, checked):
  """A kernel's features are declared once, in its module: its registry rows and (train
  kernels) its train_kernel checks read that constant."""
  kernel_module = importlib.import_module(f"meshattn.layers.kernels.{module}")
  declared = getattr(kernel_module, constant)
  rows = [k for k in registry.kernels() if k.impl.startswith(f"{kernel_module.__name__}:")]
  assert rows
  for row in rows:
    # "float32" (accepts float32 inputs) is a dtype column, not in the modules' call-check sets.
    assert row.features - registry.FLOAT32 == declared - registry.FLOAT32, row
    if checked:
      assert row.load().features is declared


def _protocol_functions():
  """(module:function, protocol) of every public function in kernels/train and kernels/decode
  that takes a kernel protocol: a train_kernel, or a function taking a cache view's arrays
  and the decode keywords (the front doors that ask the registry, taking `implementation`,
  are not kernels)."""
  views = [{f.name for f in dataclasses.fields(view) if f.init} - {"axes", "batch_name",
           "heads_name", "by_slot", "holds_window"} for view in (ContiguousView, PagedView)]
  for package in (kernels_train, kernels_decode):
    for info in pkgutil.iter_modules(package.__path__):
      module = importlib.import_module(f"{package.__name__}.{info.name}")
      for name, fn in vars(module).items():
        if (name.startswith("_") or not inspect.isfunction(fn)
            or fn.__module__ != module.__name__):
          continue
        params = set(inspect.signature(fn).parameters)
        if hasattr(fn, "index_masked"):
          yield f"{module.__name__}:{name}", "train"
        elif "implementation" not in params and any(
            {"query", "scale", "soft_cap", "sinks"} | view <= params for view in views):
          yield f"{module.__name__}:{name}", "decode"


def test_discovery_registers_every_kernel_module():
  """A kernel is its file: the registry imports every module of train/ and decode/, and each
  function there that takes a kernel protocol is registered (a forgotten registration fails
  here), with its protocol."""
  found = dict(_protocol_functions())
  assert len(found) >= 12, found  # 7 train kernels and 5 decode functions today
  registered = {k.impl: k.protocol for k in registry.kernels()}
  assert {impl: registered.get(impl) for impl in found} == found
  assert set(registered) - set(found) == {"meshattn.layers.cached_step:cached_step"}


def test_variants_of_a_name_never_tie_in_rank():
  """Which variant is tried first is its rank, never the order the modules were found in."""
  for kernel in registry.kernels():
    for platform in kernel.platforms:
      for mode in kernel.modes:
        rivals = [k for k in registry.kernels(kernel.name)
                  if platform in k.platforms and mode in k.modes]
        for features, head_dim in [((), None), (("backward",), None), (("backward",), 256)]:
          request = Request(platform, mode, frozenset(features), head_dim=head_dim)
          ranks = [k.rank_for(request) for k in rivals]
          assert len(set(ranks)) == len(ranks), (rivals, request)


def test_importing_the_layers_loads_no_pallas_backend():
  """Discovery imports every kernel module; they import their Pallas backend (Triton, Mosaic
  GPU / TPU, splash) on first use, so that importing meshattn stays cheap on any host."""
  heavy = ["jax.experimental.pallas.triton", "jax.experimental.pallas.mosaic_gpu",
           "jax.experimental.pallas.tpu", "jax.experimental.pallas.ops.tpu.splash_attention"]
  code = ("import sys, meshattn.layers\n"
          "from meshattn.layers.kernels import registry\n"
          f"print(len(registry.kernels()), [m for m in {heavy!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.stdout.split() == [str(len(registry.kernels())), "[]"], out.stdout + out.stderr


def test_gpu_flash_variants_ranked_per_request():
  """Training: cuDNN, then tokamax (soft cap), then Pallas Triton (segments / sinks / chunk);
  forward-only requests (serving prefill) rank tokamax first (measured faster forward)."""
  def pick(*features):
    return select("flash", Request("gpu", "train", frozenset(features))).description

  assert pick("causal", "gqa", "backward") == "cuDNN"
  assert pick("causal", "gqa") == "tokamax Mosaic GPU"
  assert pick("causal", "soft_cap", "backward") == "tokamax Mosaic GPU"
  assert pick("window", "soft_cap") == "tokamax Mosaic GPU"
  assert pick("causal", "segment_ids", "sinks", "backward") == "Pallas GPU (Triton)"
  assert pick("chunk", "soft_cap") == "Pallas GPU (Triton)"
  assert pick("causal", "user_mask", "backward") == "cuDNN"
  # Above head_dim 128 tokamax's backward lost to the Pallas kernel (H200, 2026-12-04).
  wide = lambda *f: select("flash", Request("gpu", "train", frozenset(f), head_dim=256,
                                            dtype="bfloat16")).description
  assert wide("causal", "soft_cap", "backward") == "Pallas GPU (Triton)"
  assert wide("causal", "soft_cap") == "tokamax Mosaic GPU"
  with pytest.raises(ValueError, match=r"no variant of attention kernel 'flash'.*cuDNN lacks"):
    select("flash", Request("gpu", "train", frozenset({"causal", "sinks", "user_mask"})))


def test_gpu_flash_falls_back_cleanly_without_tokamax(monkeypatch):
  monkeypatch.setattr(registry, "_REGISTRY", [
      registry.Kernel(**{**k.__dict__, "available": lambda: False})
      if k.description == "tokamax Mosaic GPU" else k for k in registry._REGISTRY])
  for features in ({"causal", "gqa"}, {"causal", "gqa", "backward"}):
    assert select("flash", Request("gpu", "train", frozenset(features))).description == "cuDNN"
  capped = select("flash", Request("gpu", "train", frozenset({"causal", "soft_cap", "backward"})))
  assert capped.description == "Pallas GPU (Triton)"
  chosen = select("autoselected", Request("gpu", "train", frozenset({"causal", "soft_cap"})))
  assert chosen.description == "Pallas GPU (Triton)"


@pytest.mark.parametrize("length, features, expected", [
    (256, {"causal", "soft_cap", "backward"}, "tokamax Mosaic GPU"),
    (100, {"causal", "soft_cap", "backward"}, "Pallas GPU (Triton)"),  # cuDNN has no soft cap
    (200, {"window", "gqa"}, "cuDNN"),  # forward-only: tokamax first where it tiles the length
    (256, {"window", "gqa"}, "tokamax Mosaic GPU"),
])
def test_tokamax_is_skipped_for_lengths_it_cannot_tile(length, features, expected, monkeypatch):
  """The registry decides: a length tokamax cannot tile goes to the next `flash` variant (no
  fallback inside the kernel), and the kernel itself refuses it, naming the lengths."""
  from meshattn.layers.kernels.api import KernelOptions
  from meshattn.layers.kernels.train import flash_tokamax
  monkeypatch.setattr(registry, "_REGISTRY", [  # as on a Hopper GPU with tokamax installed
      registry.Kernel(**{**k.__dict__, "available": lambda: True})
      if k.description == "tokamax Mosaic GPU" else k for k in registry._REGISTRY])
  request = Request("gpu", "train", frozenset(features), head_dim=64, dtype="bfloat16",
                    q_len=length, kv_len=length)
  assert select("flash", request).description == expected
  x = jnp.zeros((1, 100, 2, 16), jnp.bfloat16)
  pos = jnp.arange(100)[None]
  with pytest.raises(ValueError, match="q_len 100 and kv_len 100 not a multiple of 128"):
    flash_tokamax.tokamax_attention(x, x, x, options=KernelOptions(scale=0.25),
                                    q_positions=pos, kv_positions=pos)


def test_tokamax_module_imports_and_refuses_without_tokamax():
  """The adapter imports anywhere; on a machine without tokamax / a Hopper GPU it is
  unavailable, and it names the features it lacks before any work."""
  from meshattn.layers.kernels.train import flash_tokamax
  from meshattn.layers.kernels.api import KernelOptions
  from meshattn.layers.masks import MaskSpec
  if jax.default_backend() == "cpu":
    assert not flash_tokamax.tokamax_available()
  x = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  pos = jnp.arange(8)[None]
  options = KernelOptions(mask=MaskSpec("chunk", chunk=4), scale=0.25)
  with pytest.raises(ValueError, match="tokamax_attention does not support chunk"):
    flash_tokamax.tokamax_attention(x, x, x, options=options, q_positions=pos, kv_positions=pos)
  with pytest.raises(ValueError, match="float16 or bfloat16"):
    flash_tokamax.tokamax_attention(x.astype(jnp.float32), x, x, options=KernelOptions(scale=0.25),
                                    q_positions=pos, kv_positions=pos)


def test_index_masked_kernels_are_declared():
  """Kernels whose masks ignore the given positions keep whole query rows under shard_map."""
  by_index = {k.description for k in registry.kernels() if k.masks_by_index}
  assert by_index == {k.description for k in registry.kernels("flash")}


# ---- Limits: head dims, dtypes, shared memory (issue 14.8) --------------------------------

PACKED_SINKS = frozenset({"causal", "gqa", "segment_ids", "sinks", "backward"})


def test_request_validates_and_normalises_shape_fields():
  assert Request("gpu", "train", frozenset(), dtype=jnp.bfloat16).dtype == "bfloat16"
  assert Request("gpu", "train", frozenset({"float32"})).input_dtype == "float32"
  for bad in (0, -64, 64.0, True):
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
      Request("gpu", "train", frozenset(), head_dim=bad)


def test_gemma2_packed_sinks_head_dim_256_is_served_by_a_kernel_that_fits():
  """The issue's crash: b4 s4096 hq16 hkv8 head_dim 256, packed documents + sinks, training on
  an H200. flash (Pallas) serves it with tiles whose shared memory fits; a head_dim it has no
  tiles for goes to blockwise when autoselected and raises, naming the limit, when named."""
  from meshattn.layers.kernels.train import flash_pallas_gpu_tiles as tiles
  request = Request("gpu", "train", PACKED_SINKS, head_dim=256, dtype="bfloat16")
  assert select("autoselected", request).description == "Pallas GPU (Triton)"
  need = tiles.Tiles.get_default(256, 2).shared_memory(256, 2)
  assert max(need.values()) <= tiles.HOPPER_SHARED_MEMORY, need
  wide = Request("gpu", "train", PACKED_SINKS, head_dim=512, dtype="bfloat16")
  assert select("autoselected", wide).name == "blockwise"
  with pytest.raises(ValueError, match=r"flash.*cannot run head_dim 512 \(runs a power of two, "
                                       r">= 16, <= 256\).*kernels that can: \['blockwise'"):
    select("flash", wide)


@pytest.mark.parametrize("head_dim, dtype, expected", [
    (128, "bfloat16", "cuDNN"),
    (256, "bfloat16", "cuDNN"),  # Hopper: cuDNN runs up to 256
    (96, "bfloat16", "cuDNN"),  # a multiple of 8, not a power of two
    (100, "bfloat16", "tokamax Mosaic GPU"),  # cuDNN needs multiples of 8; tokamax pads
    (512, "bfloat16", "blockwise"),  # no GPU flash variant runs it
    (128, "float32", "Pallas GPU (Triton)"),  # cuDNN and tokamax take 16-bit inputs only
    (80, "float32", "blockwise"),  # ... and Pallas needs a power of two
])
def test_autoselect_skips_variants_that_cannot_run_the_shape(head_dim, dtype, expected):
  features = {"causal", "gqa", "backward"} | ({"float32"} if dtype == "float32" else set())
  request = Request("gpu", "train", frozenset(features), head_dim=head_dim, dtype=dtype)
  kernel = select("autoselected", request)
  assert expected in (kernel.name, kernel.description)


def test_cudnn_head_dim_limit_before_hopper(monkeypatch):
  monkeypatch.setattr(registry, "gpu_capability", lambda: 8.0)
  request = Request("gpu", "train", frozenset({"causal", "backward"}), head_dim=256,
                    dtype="bfloat16")
  with pytest.raises(ValueError, match=r"cuDNN cannot run head_dim 256 \(<= 128 before Hopper"):
    select("flash", request.__class__("gpu", "train", request.features | {"user_mask"},
                                      head_dim=256, dtype="bfloat16"))
  assert select("flash", request).description == "Pallas GPU (Triton)"


def test_named_kernel_names_the_dtype_limit():
  request = Request("gpu", "train", frozenset({"causal", "user_mask"}), dtype="float64")
  with pytest.raises(ValueError, match=r"cuDNN cannot run dtype float64 \(runs \['bfloat16', "
                                       r"'float16'\]\)"):
    select("flash", request)


def test_gpu_decode_kernels_need_power_of_two_head_dims():
  def pick(head_dim, *features):
    return select("autoselected", Request("gpu", "autoregressive", frozenset({"causal", *features}),
                                          head_dim=head_dim, dtype="bfloat16")).name

  assert pick(128) == "ragged" and pick(128, "paged_kv") == "paged"
  assert pick(80) == "dot_product" and pick(80, "paged_kv") == "dot_product"
  # The limits hold on GPU only: the CPU's JAX path runs any head_dim.
  assert select("ragged", Request("cpu", "autoregressive", frozenset({"causal"}),
                                  head_dim=80)).name == "ragged"


def test_declared_dtypes_agree_with_the_float32_feature():
  for kernel in registry.kernels():
    if kernel.limits.dtypes is not None:
      assert ("float32" in kernel.limits.dtypes) == ("float32" in kernel.features), kernel
  assert ("| flash (Pallas GPU (Triton)) | gpu | a power of two, >= 16, <= 256 | bfloat16, "
          "float16, float32 |") in registry.limits_table_markdown()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(platform=st.sampled_from(registry.PLATFORMS),
       mode=st.sampled_from(["train", "prefill", "autoregressive"]),
       features=st.sets(st.sampled_from(["gqa", "segment_ids", "soft_cap", "sinks", "backward",
                                         "float32", "paged_kv", "user_mask"])),
       head_dim=st.sampled_from([None, 8, 48, 64, 80, 100, 128, 192, 256, 512]),
       half=st.sampled_from([None, "bfloat16", "float16"]))
def test_autoselect_never_picks_a_kernel_that_cannot_run_the_shape(platform, mode, features,
                                                                   head_dim, half):
  dtype = "float32" if "float32" in features else half
  request = Request(platform, mode, frozenset(features | {"causal"}), head_dim=head_dim,
                    dtype=dtype)
  try:
    kernel = select("autoselected", request)
  except ValueError:
    assert not any(k.serves(request) for k in registry.kernels())
    return
  assert not kernel.limits.violations(request)
  assert request.features <= kernel.features


def test_autoselect_skips_splash_for_lengths_it_cannot_tile():
  """Splash tiles both lengths in 128-lane blocks: autoselect passes over it for other
  lengths (the next kernel serves), and naming it explicitly says why."""
  features = frozenset({"causal", "backward"})
  tileable = registry.Request("tpu", "train", features, q_len=256, kv_len=256)
  assert registry.select("autoselected", tileable).name == "flash"
  ragged = registry.Request("tpu", "train", features, q_len=9, kv_len=9)
  assert registry.select("autoselected", ragged).name != "flash"
  with pytest.raises(ValueError, match="multiple of 128"):
    registry.select("flash", ragged)
