"""kvcompress: pluggable KV-cache compression for Hugging Face transformers, on one shared attention core."""

from . import registry
from .attention import attend, capture, enable, set_backend
from .cache import CompressedCache, CompressedLayer, UnsupportedFeatureError, cache_arg
from .strategies import (
    AnchorCache,
    ExpectedAttentionCache,
    FullCache,
    KnormCache,
    LabelWordCache,
    PyramidKVCache,
    RandomKeepCache,
    SinkWindowCache,
    SnapKVCache,
)

__all__ = [
    "AnchorCache",
    "CompressedCache",
    "CompressedLayer",
    "ExpectedAttentionCache",
    "FullCache",
    "KnormCache",
    "LabelWordCache",
    "PyramidKVCache",
    "RandomKeepCache",
    "SinkWindowCache",
    "SnapKVCache",
    "UnsupportedFeatureError",
    "attend",
    "cache_arg",
    "capture",
    "enable",
    "registry",
    "set_backend",
]
__version__ = "0.1.0"
