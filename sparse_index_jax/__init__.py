"""sparse_index_jax: DeepSeek-style sparse attention selection (DSA) in JAX, with Flax NNX layers."""

from sparse_index_jax.attention import DSAAttention, DSACache, DSAOutput
from sparse_index_jax.config import DSAConfig, IndexerConfig, MLAConfig, RopeConfig
from sparse_index_jax.indexer import IndexerActivations, LightningIndexer
from sparse_index_jax.selection import METHODS, Selection, select_topk

__version__ = "0.1.0"

__all__ = [
    "DSAAttention", "DSACache", "DSAConfig", "DSAOutput", "IndexerActivations", "IndexerConfig",
    "LightningIndexer", "METHODS", "MLAConfig", "RopeConfig", "Selection", "select_topk", "__version__",
]
