"""Selection: the contract (``Selection``), the method registry and ``Selector``, context-parallel
selection (``context_parallel``) and agreement metrics (``metrics``)."""

from sparse_index_jax.selection.contract import Selection, causal_selection
from sparse_index_jax.selection.methods import METHODS, Method, Selector, select_topk

__all__ = ["METHODS", "Method", "Selection", "Selector", "causal_selection", "select_topk"]
