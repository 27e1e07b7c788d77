"""The Attention layer, its settings, masks, RoPE, the Linen bridge and the decoder LM built
from it."""

from meshattn.layers.attention import KNOWN_KERNELS, Attention
from meshattn.layers.cache_specs import ContiguousCache, PagedCache, StateCache
from meshattn.layers.decoder import Decoder
from meshattn.layers.flax_compat import AttentionType, MultiHeadAttention
from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.train.dot_product import dot_product_attention
from meshattn.layers.linen_bridge import attention_as_linen
from meshattn.layers.masks import (
    ATTENTION_TYPES, MaskSpec, combine_masks, make_attention_mask, make_causal_mask)
from meshattn.layers.rope import ROPE_TYPES, RopeSpec, apply_rope
from meshattn.layers.settings import (
    DEFAULT_LOGICAL_AXIS_RULES, MODEL_MODES, ActivationAxes, AttentionSettings, ModeAxes)

__all__ = [
    "ATTENTION_TYPES", "ActivationAxes", "Attention", "AttentionSettings", "AttentionType",
    "ContiguousCache", "PagedCache", "StateCache",
    "DEFAULT_LOGICAL_AXIS_RULES", "Decoder", "KNOWN_KERNELS", "KernelOptions", "MODEL_MODES", "MaskSpec",
    "ModeAxes", "MultiHeadAttention", "ROPE_TYPES", "RopeSpec", "apply_rope", "attention_as_linen",
    "combine_masks", "dot_product_attention", "make_attention_mask", "make_causal_mask",
]
