"""MRoPE (Qwen2-VL's multimodal RoPE): position streams [n, B, T], frequency i rotating by the
stream of its mrope_section. Checked against the float64 reference (and the reference against
its scalar loops), plus the identities that pin the convention down: equal streams are plain
RoPE, and only a stream's own frequencies move when that stream changes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.layer_params import randomize, ref_settings
from helpers.naive_reference import attention_layer_naive
from helpers.numpy_reference import apply_rope_np, attention_layer_np, mrope_streams_np
from meshattn.configs import ConfigError, load_config
from meshattn.layers import Attention, MaskSpec, RopeSpec
from meshattn.layers.rope import apply_rope

B, T, D = 2, 7, 32


def streams(seed=0, batch=B, length=T):
  """Three distinct position streams [3, B, T]: temporal increasing, height / width on a grid."""
  rng = np.random.default_rng(seed)
  t = np.sort(rng.integers(0, 20, size=(batch, length)), axis=-1)
  return np.stack([t, rng.integers(0, 6, size=(batch, length)),
                   rng.integers(0, 9, size=(batch, length))]).astype(np.int32)


def test_apply_rope_sections():
  """Equal streams == plain RoPE; changing the height stream moves exactly the section-1
  frequencies (dims [2, 5) and [2 + 8, 5 + 8) of a 16-wide rotated half-split)."""
  spec = RopeSpec(mrope_section=(2, 3, 3))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, 2, 16)), jnp.float32)
  pos = jnp.asarray(streams()[0])
  plain = apply_rope(x, pos, RopeSpec())
  np.testing.assert_array_equal(apply_rope(x, jnp.stack([pos, pos, pos]), spec), plain)
  moved = apply_rope(x, jnp.stack([pos, pos + 5, pos]), spec)
  changed = np.any(np.abs(np.asarray(moved - plain)) > 1e-6, axis=(0, 1, 2))  # [16]
  expected = np.zeros(16, bool)
  expected[2:5] = expected[10:13] = True
  np.testing.assert_array_equal(changed, expected)
  np.testing.assert_array_equal(mrope_streams_np((2, 3, 3)), [0, 0, 1, 1, 1, 2, 2, 2])


def _hf_mrope_np(x, pos, sections, theta=10000.0):
  """Qwen2-VL's formula as Hugging Face writes it (apply_multimodal_rotary_pos_emb): cos/sin
  per stream over the duplicated [freqs, freqs] layout, split into sections * 2 chunks, chunk i
  taken from stream i % 3, then x * cos + rotate_half(x) * sin."""
  head_dim = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)  # [H/2]
  freqs = np.asarray(pos, np.float64)[..., None] * inv  # [3, B, T, H/2]
  emb = np.concatenate([freqs, freqs], axis=-1)  # [3, B, T, H]
  bounds = np.cumsum(list(sections) * 2)[:-1]
  pick = lambda table: np.concatenate(
      [chunk[i % 3] for i, chunk in enumerate(np.split(table, bounds, axis=-1))], axis=-1)
  cos, sin = pick(np.cos(emb))[:, :, None], pick(np.sin(emb))[:, :, None]  # [B, T, 1, H]
  half = head_dim // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def test_matches_hugging_face_formula():
  x = np.random.default_rng(9).normal(size=(B, T, 2, 16))
  pos = streams(10)
  got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), RopeSpec(mrope_section=(2, 3, 3)))
  np.testing.assert_allclose(got, _hf_mrope_np(x, pos, (2, 3, 3)), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(apply_rope_np(x, pos, dict(mrope_section=(2, 3, 3))),
                             _hf_mrope_np(x, pos, (2, 3, 3)), rtol=1e-12, atol=1e-12)


def test_reference_matches_naive_loops():
  rng = np.random.default_rng(2)
  b, t, d, n, k, h = 2, 4, 6, 4, 2, 8
  params = {"query.kernel": rng.normal(size=(d, n, h)), "key.kernel": rng.normal(size=(d, k, h)),
            "value.kernel": rng.normal(size=(d, k, h)), "out.kernel": rng.normal(size=(n, h, 3))}
  rope = dict(type="default", partial_rotary_factor=0.75, mrope_section=(1, 1, 1))
  kw = dict(num_query_heads=n, num_kv_heads=k, head_dim=h, q_positions=streams(3, b, t),
            scale=0.4, rope=rope)
  x = rng.normal(size=(b, t, d))
  out, w = attention_layer_np(params, x, **kw)
  out_n, w_n = attention_layer_naive(params, x, **kw)
  np.testing.assert_allclose(out, out_n, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(w, w_n, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kv_heads, rope", [
    (4, RopeSpec(mrope_section=(1, 1, 2))),
    (2, RopeSpec(mrope_section=(1, 1, 1), partial_rotary_factor=0.75, max_timescale=500.0)),
    (1, RopeSpec("llama3.1", factor=8.0, original_max_position_embeddings=4,
                 mrope_section=(2, 1, 1))),
], ids=["mha", "gqa_partial", "mqa_llama3"])
def test_layer_matches_numpy(kv_heads, rope):
  kw = dict(emb_dim=D, num_query_heads=4, num_kv_heads=kv_heads, head_dim=8, rope=rope,
            use_qk_norm=True)
  model = Attention(rngs=nnx.Rngs(0), **kw)
  params = randomize(model, 11)
  x = np.random.default_rng(4).normal(size=(B, T, D)).astype(np.float32)
  pos = streams(5)
  got = model(jnp.asarray(x), inputs_positions=jnp.asarray(pos))
  want, _ = attention_layer_np(params, x, q_positions=pos, **ref_settings(kw))
  err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
  assert err < 1e-5, err
  # The streams matter: the temporal stream alone gives an output 100x the tolerance away
  # (the llama3.1 case least: its height / width streams drive its slowest frequencies).
  alone, _ = attention_layer_np(params, x, q_positions=pos[0], **ref_settings(kw))
  assert np.abs(alone - want).max() > 1e-3 * np.abs(want).max()


def test_extra_batch_dims_and_cached_modes():
  """Streams [3, 2, B, T] for extra batch dims, and prefill + decode with explicit streams equal
  the train forward (decode steps pass their [3, B, 1] positions)."""
  model = Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8,
                    rope=RopeSpec(mrope_section=(2, 1, 1)), mask=MaskSpec("global"))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, D)), jnp.float32)
  pos = jnp.asarray(streams(7))
  train = nnx.jit(lambda m, x, p: m(x, inputs_positions=p))(model, x, pos)
  x2, pos2 = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, D)), jnp.float32), pos[::-1]
  other = model(x2, inputs_positions=pos2)
  both = model(jnp.stack([x, x2]), inputs_positions=jnp.stack([pos, pos2], axis=1))
  np.testing.assert_allclose(both, jnp.stack([train, other]), rtol=1e-5, atol=1e-5)

  step = nnx.jit(lambda m, x, p, mode: m(x, inputs_positions=p, model_mode=mode),
                 static_argnames="mode")
  model.init_cache(B, 16)
  outs = [step(model, x[:, :3], pos[:, :, :3], "prefill")]
  outs += [step(model, x[:, i:i + 1], pos[:, :, i:i + 1], "autoregressive") for i in range(3, T)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), train, rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
  model = Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, head_dim=8,
                    rope=RopeSpec(mrope_section=(1, 1, 2)))
  x = jnp.zeros((B, T, D))
  with pytest.raises(ValueError, match=r"inputs_positions has shape \(2, 2, 7\): .* or \[3, "):
    model(x, inputs_positions=jnp.zeros((2, B, T), jnp.int32))
  plain = Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, head_dim=8)
  with pytest.raises(ValueError, match="position streams need use_mrope"):
    plain(x, inputs_positions=jnp.zeros((3, B, T), jnp.int32))
  with pytest.raises(ValueError, match=r"mrope_section=\(1, 1, 1\) sums to 3; it must cover the 4"):
    Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, head_dim=8,
              rope=RopeSpec(mrope_section=(1, 1, 1)))
  with pytest.raises(ConfigError, match=r"mrope_section: \[4, 4\] sums to 8; it must cover the 4"):
    load_config("tiny", "head_dim=8", "use_mrope=true", "mrope_section=[4, 4]")
  with pytest.raises(ConfigError, match="use_mrope: needs RoPE"):
    load_config("tiny", "use_mrope=true", "rope_type=none")
  cfg = load_config("tiny", "head_dim=8", "use_mrope=true", "mrope_section=[2, 1, 1]")
  assert Attention(cfg, rngs=nnx.Rngs(0)).settings.rope.mrope_section == (2, 1, 1)
  assert RopeSpec(mrope_section=[2, 1, 1]).mrope_section == (2, 1, 1)  # hashable
  with pytest.raises(ValueError, match="positive integers"):
    RopeSpec(mrope_section=(True, 1, 2))
  with pytest.raises(ConfigError, match="mrope_section: use_mrope needs positive integers"):
    load_config("tiny", "head_dim=8", "use_mrope=true", "mrope_section=[true, 1, 2]")


def test_nope_layers_of_an_mrope_model_take_the_streams():
  """A NoPE layer of an MRoPE model has no rotation but takes the same [3, B, T] positions;
  its temperature tuning follows the temporal stream."""
  cfg = load_config("tiny", "head_dim=8", "use_mrope=true", "mrope_section=[2, 1, 1]",
                    "nope_layer_interval=2", "temperature_tuning=true",
                    "temperature_tuning_floor_scale=2.0")
  nope = Attention(cfg, rngs=nnx.Rngs(0), layer_idx=1)
  assert nope.settings.rope.mrope_section == () and nope.settings.temperature_tuning
  x = jnp.asarray(np.random.default_rng(11).normal(size=(B, T, cfg.emb_dim)), jnp.float32)
  pos = jnp.asarray(streams(12))
  np.testing.assert_allclose(nope(x, inputs_positions=pos), nope(x, inputs_positions=pos[0]),
                             rtol=1e-6, atol=1e-6)
  # The temporal stream matters (temperature), the others do not (no rotation).
  assert not np.allclose(nope(x, inputs_positions=pos), nope(x, inputs_positions=pos[1]))
