"""kvcompress: pluggable KV-cache compression for Hugging Face transformers, on one shared attention core."""

from . import registry
from .attention import attend, capture, enable, set_backend
from .cache import CompressedCache, CompressedLayer, UnsupportedFeatureError
from .strategies import FullCache, SinkWindowCache

__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "FullCache",
    "SinkWindowCache",
    "UnsupportedFeatureError",
    "attend",
    "capture",
    "enable",
    "registry",
    "set_backend",
]
__version__ = "0.1.0"
