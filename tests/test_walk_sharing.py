"""The walk-sharing model (bench/walk_sharing.py): its block counts on hand-made lists, and a layer report on
synthetic activations (the SmolLM2 run itself is a benchmark, `sparse-index bench walk`)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_index_jax.bench.walk_sharing import WalkSetup, key_blocks, layer_report


def test_key_blocks_counts_the_union_and_each_query():
    # 2 programs of 2 queries, key blocks of 4: query rows list positions (-1 none), limits cut them.
    positions = np.array([[0, 1, 9, -1], [1, 2, 3, 5], [8, 12, -1, -1], [13, 14, 15, 0]])
    limits = np.array([10, 6, 16, 16])
    union, own = key_blocks(positions, limits, 4, 2)
    np.testing.assert_array_equal(own, [2, 2, 2, 2])      # {0, 2}, {0, 1}, {2, 3}, {3, 0}
    np.testing.assert_array_equal(union, [3, 3])          # {0, 1, 2}, {0, 2, 3}


def test_layer_report_on_synthetic_activations():
    T, H, d = 256, 4, 16
    kq, kk, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    act = types.SimpleNamespace(q=jax.random.normal(kq, (1, T, H, d)), k=jax.random.normal(kk, (1, T, d)),
                                w=jax.random.normal(kw, (1, T, H)), k_scale=None)
    setup = WalkSetup(seq_len=T, topk=16, block_k=16, hisa_block=16, hisa_blocks=4, misa_block=64, misa_heads=2)
    report = layer_report(act, setup)
    hisa, misa_h, merged = report["hisa"], report["misa_h"], report["misa_h_merged_walk"]
    assert 0 < hisa["walk_over_dsa"] < 1 and 1 <= hisa["sharing"] <= setup.program_queries
    assert hisa["predicted_speedup"] == pytest.approx(1 / hisa["work_over_dsa"])
    assert misa_h["routed_scan_over_dsa"] == pytest.approx(2 / H)
    # each query scores at most min(t + 1, candidates) rows: the gathered walk is below the merged one
    assert 0 < misa_h["walk_over_dsa"] <= merged["walk_over_dsa"] <= 1


def test_setup_rejects_what_cannot_hold_topk():
    with pytest.raises(ValueError, match="cannot hold"):
        WalkSetup(topk=256, hisa_block=64, hisa_blocks=4)
    with pytest.raises(ValueError, match="multiple of program_queries"):
        WalkSetup(seq_len=1001)
