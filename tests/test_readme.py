"""The README's quickstart runs as written."""

from __future__ import annotations

import pathlib
import re


def test_quickstart_runs():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), scope)
    assert scope["res"].out.shape == (2, 1, 256)
    assert scope["sel"].indices.shape == (2, 512, 64)
    assert int(scope["res"].cache.lengths[0]) == 513


def test_the_module_map_names_every_module_and_only_those():
    root = pathlib.Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"## Design\n.*?```\n(.*?)```", readme, re.S).group(1)
    named = set(re.findall(r"\b\w+\.py\b", block))
    files = {p.name for folder in ("sparse_index_jax", "pallas_kernels", "models", "bench")
             for p in (root / folder).rglob("*.py")}
    assert files - named == set(), "modules missing from the README's map"
    assert named - files == set(), "the README's map names modules that do not exist"
