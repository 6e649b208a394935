"""One file per strategy; each registers its cache class by name (see `kvcompress.registry`)."""

from .anchor import AnchorCache
from .expected_attention import ExpectedAttentionCache
from .full import FullCache
from .h2o import H2OCache
from .knorm import KnormCache
from .kvzip import KVzipCache
from .label_words import LabelWordCache
from .pyramidkv import PyramidKVCache
from .random_keep import RandomKeepCache
from .sink_window import SinkWindowCache
from .snapkv import SnapKVCache
from .tova import TOVACache

__all__ = [
    "AnchorCache",
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
]
