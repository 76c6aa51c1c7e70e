"""Layers: configs, RoPE, norms, the fp8 / Hadamard path, the lightning indexer, DSA and GQA attention with
their caches, IndexCache patterns and the sharding rules. Built on ``selection`` and ``kernels``."""
