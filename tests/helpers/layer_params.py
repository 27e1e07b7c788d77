"""Random parameters for a layer, read back by name, and the float64 reference's keywords
derived from the layer's keywords (tests/helpers/numpy_reference.py)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.layers import MaskSpec, RopeSpec


def _path_name(path) -> str:
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", None))
    if name == "value" and isinstance(key, jax.tree_util.GetAttrKey):
      continue  # the Variable's payload
    parts.append(str(name))
  return ".".join(parts)


def randomize(model: nnx.Module, seed: int) -> dict[str, np.ndarray]:
  """Replace every nnx.Param with random values; return them as float64 by name."""
  rng = np.random.default_rng(seed)
  out: dict[str, np.ndarray] = {}

  def draw(path, leaf):
    name = _path_name(path)
    shape = leaf.shape
    if name.endswith("kernel"):
      fan_in = math.prod(shape[:2]) if name.startswith("out.") else shape[0]
      value = rng.normal(size=shape) / math.sqrt(fan_in)
    elif name.endswith("bias"):
      value = 0.5 * rng.normal(size=shape)
    elif name.endswith("norm.scale"):
      value = 1.0 + 0.5 * rng.normal(size=shape)
    elif name == "sinks":
      value = rng.normal(size=shape)
    else:
      raise AssertionError(f"unexpected parameter {name}")
    new = jnp.asarray(value, leaf.dtype)
    out[name] = np.asarray(new, np.float64)  # exactly what the layer holds
    return new

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.Param)))
  return out


def ref_settings(kw: dict) -> dict:
  """The reference's keywords, derived from the layer keywords by the test itself."""
  n = kw["num_query_heads"]
  k = kw.get("num_kv_heads") or n
  h = kw.get("head_dim") or (kw.get("qkv_features") or kw["emb_dim"]) // n
  mask = kw.get("mask", MaskSpec())
  rope = dataclasses.asdict(kw.get("rope", RopeSpec()))
  rope["type"] = rope.pop("rope_type")
  return dict(
      num_query_heads=n, num_kv_heads=k, head_dim=h, attention_type=mask.attention_type,
      window=mask.window, chunk=mask.chunk, soft_cap=kw.get("attn_logits_soft_cap"),
      scale=(kw.get("query_pre_attn_scalar") or h) ** -0.5,
      use_qk_norm=kw.get("use_qk_norm", False), qk_norm_type=kw.get("qk_norm_type", "rms"),
      eps=kw.get("normalization_layer_epsilon", 1e-6),
      temperature=((kw.get("temperature_tuning_scale", 0.1),
                    kw.get("temperature_tuning_floor_scale", 8192.0))
                   if kw.get("temperature_tuning") else None),
      rope=rope, fused_qkv=kw.get("fused_qkv", False),
      share_kv=kw.get("share_kv_projections", False), use_bias=kw.get("use_bias", False))
