"""Ops on the top-k scoring path and sparse attention.

Each op is a sub-package with a plain-JAX ``reference.py`` (also the ``xla`` implementation), its
kernels, and one entry point in ``__init__.py`` taking ``implementation="auto" | "xla" | "pallas"``.
"""
