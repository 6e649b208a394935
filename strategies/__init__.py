"""One file per strategy; each registers its cache class by name (see `kvcompress.registry`)."""

from .anchor import AnchorCache
from .expected_attention import ExpectedAttentionCache
from .full import FullCache
from .knorm import KnormCache
from .label_words import LabelWordCache
from .pyramidkv import PyramidKVCache
from .random_keep import RandomKeepCache
from .sink_window import SinkWindowCache
from .snapkv import SnapKVCache

__all__ = [
    "AnchorCache",
    "ExpectedAttentionCache",
    "FullCache",
    "KnormCache",
    "LabelWordCache",
    "PyramidKVCache",
    "RandomKeepCache",
    "SinkWindowCache",
    "SnapKVCache",
]
