"""Ops on the top-k scoring path and sparse attention: ``sparse_index_jax.kernels``.

Each op is a sub-package: ``reference.py`` (plain JAX, the ``xla`` implementation and the oracle),
``triton.py`` (Pallas, Triton lowering: GPU), ``mosaic_tpu.py`` (Pallas, Mosaic TPU lowering), and the
entry point in ``__init__.py`` with the op's options dataclass. ``dispatch.py`` owns the implementation
names and ``implementation="auto"``; ``ranking.py`` the tie rule; ``chunking.py`` and ``inputs.py`` the
padding, chunking and input checks every op shares.

    dsa_topk     DSA scoring + exact top-k                      dsa_topk(q, k, w, topk=...)
    hisa_topk    HISA: block filter, then token refinement      hisa_topk(..., block_size=, num_blocks=)
    misa_topk    MISA / MISA-H: routed heads (+ all-head re-rank)  misa_topk(..., active_heads=, candidates=)
    sparse_mla   attention over selected latent rows (MLA)     sparse_mla(q, kv, indices, valid, ...)
    sparse_gqa   attention over selected keys (GQA, Llama)     sparse_gqa(q, k, v, indices, valid, ...)
"""
