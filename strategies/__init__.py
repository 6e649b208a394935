"""One file per strategy; each registers its cache class by name (see `kvcompress.registry`)."""

from .anchor import AnchorCache
from .full import FullCache
from .h2o import H2OCache
from .label_words import LabelWordCache
from .random_keep import RandomKeepCache
from .sink_window import SinkWindowCache
from .tova import TOVACache

__all__ = ["AnchorCache", "FullCache", "H2OCache", "LabelWordCache", "RandomKeepCache", "SinkWindowCache", "TOVACache"]
