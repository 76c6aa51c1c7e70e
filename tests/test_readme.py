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
