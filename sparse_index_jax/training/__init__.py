"""Indexer training: the multi-layer distillation loss and the two-stage (dense warm-up, sparse) loop."""
