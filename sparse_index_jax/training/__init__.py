"""Training: the distillation losses and loop (``distill``), IndexCache's pattern search
(``index_cache_search``), token data (``data``) and multi-host runs (``distributed``)."""
