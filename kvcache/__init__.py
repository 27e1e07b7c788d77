"""KV caches for prefill / autoregressive decoding, and KV quantization."""

from meshattn.kvcache.base import CacheBase, KVCacheBase
from meshattn.kvcache.cache import CACHE_AXIS_NAMES, KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.state import LinearStateCache
from meshattn.kvcache.quant import KV_QUANT_AXES, KVQuant, dequantize, quantize

__all__ = ["CACHE_AXIS_NAMES", "CacheBase", "KVCache", "KVCacheBase", "KVQuant", "PagedKVCache",
           "KV_QUANT_AXES", "LinearStateCache", "dequantize", "quantize"]
