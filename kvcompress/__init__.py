"""kvcompress: pluggable KV-cache compression for Hugging Face transformers, on one shared attention core."""

from . import registry
from .attention import attend, capture, enable, set_backend
from .cache import CompressedCache, CompressedLayer, UnsupportedFeatureError, cache_arg, prepare
from .cache_group import CacheGroup
from .shared_prefill import prefill_shared
from .strategies import (
    AnchorCache,
    ExpectedAttentionCache,
    FullCache,
    H2OCache,
    KnormCache,
    KVzipCache,
    LabelWordCache,
    PyramidKVCache,
    RandomKeepCache,
    SinkWindowCache,
    SnapKVCache,
    TOVACache,
)

__all__ = [
    "AnchorCache",
    "CacheGroup",
    "CompressedCache",
    "CompressedLayer",
    "ExpectedAttentionCache",
    "FullCache",
    "H2OCache",
    "KnormCache",
    "KVzipCache",
    "LabelWordCache",
    "PyramidKVCache",
    "RandomKeepCache",
    "SinkWindowCache",
    "SnapKVCache",
    "TOVACache",
    "UnsupportedFeatureError",
    "attend",
    "cache_arg",
    "capture",
    "enable",
    "prefill_shared",
    "prepare",
    "registry",
    "set_backend",
]
__version__ = "0.1.0"
