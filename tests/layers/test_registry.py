"""The kernel registry: explicit choices that cannot serve a request raise with
the documented message, autoselect never loses a feature, its choice per
platform is pinned, and the README's table is the registry's."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from meshattn.layers import Attention
from meshattn.layers.kernels import registry
from meshattn.layers.kernels.registry import FEATURES, Request, select

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
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
  assert registry.feature_table_markdown() in README.read_text()


def test_layer_refuses_an_explicit_kernel_missing_a_feature():
  model = Attention(rngs=nnx.Rngs(params=0, dropout=1), emb_dim=16, num_query_heads=2,
                    attention="blockwise", dropout_rate=0.1)
  with pytest.raises(ValueError, match=r"blockwise.*\['dropout'\]"):
    model(jnp.ones((1, 4, 16)), deterministic=False)
  with pytest.raises(ValueError, match="decode_attention"):
    Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=2, attention="ragged")
  with pytest.raises(ValueError, match="decode_attention"):
    Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=2, decode_attention="flash")


@pytest.mark.parametrize("module, constant, registered", [
    ("flash_tpu", "SPLASH_FEATURES", "SPLASH_FEATURES"),
    ("flash_gpu", "CUDNN_FEATURES", "CUDNN_FEATURES"),
    ("flash_tokamax", "TOKAMAX_FEATURES", "TOKAMAX_FEATURES"),
    ("flash_pallas_gpu", "PALLAS_GPU_FLASH_FEATURES", "PALLAS_GPU_FLASH_FEATURES"),
    ("blockwise", "BLOCKWISE_FEATURES", "BLOCKWISE_FEATURES"),
    ("ragged", "RAGGED_FEATURES", "RAGGED_FEATURES"),
    ("paged", "PAGED_FEATURES", "PAGED_FEATURES"),
])
def test_registered_features_match_each_kernel_module(module, constant, registered):
  """The registry states features without importing kernels; they must agree."""
  import importlib
  declared = getattr(importlib.import_module(f"meshattn.layers.kernels.{module}"), constant)
  # "float32" (accepts float32 inputs) is a registry-level dtype fact, not in the modules' sets.
  assert frozenset(declared) - {"float32"} == getattr(registry, registered) - {"float32"}


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


def test_tokamax_module_imports_and_refuses_without_tokamax():
  """The adapter imports anywhere; on a machine without tokamax / a Hopper GPU it is
  unavailable, and it names the features it lacks before any work."""
  from meshattn.layers.kernels import flash_tokamax
  from meshattn.layers.kernels.dot_product import KernelOptions
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
