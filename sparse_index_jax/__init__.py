"""sparse_index_jax: DeepSeek-style sparse attention selection (DSA, HISA, MISA) in JAX, with Flax NNX layers.

One import root, in layers that import only downward (the README's "Design" section draws them):

    kernels      sparse_index_jax.kernels    (folder pallas_kernels/) ops: reference, Triton, Mosaic TPU
    selection    sparse_index_jax.selection  the Selection contract, METHODS and Selector, metrics
    layers       sparse_index_jax.layers     indexer, DSA / GQA attention, caches, configs, sharding
    models       sparse_index_jax.models     (folder models/) DeepSeek-V3.2, GLM-5, Llama family, converters
    training     sparse_index_jax.training   distillation, IndexCache search, data, multi-host
    applications sparse_index_jax.cli, sparse_index_jax.bench (folder bench/)

This module re-exports the everyday names of the selection and layers layers.
"""

from sparse_index_jax.layers.config import DSAConfig, IndexerConfig, IndexerWeights, MLAConfig, RopeConfig
from sparse_index_jax.layers.dsa_attention import DSAAttention, DSACache, DSAOutput
from sparse_index_jax.layers.indexer import IndexerActivations, LightningIndexer
from sparse_index_jax.selection import METHODS, Selection, Selector, select_topk

__version__ = "0.1.0"

__all__ = [
    "DSAAttention", "DSACache", "DSAConfig", "DSAOutput", "IndexerActivations", "IndexerConfig", "IndexerWeights",
    "LightningIndexer", "METHODS", "MLAConfig", "RopeConfig", "Selection", "Selector", "select_topk", "__version__",
]
