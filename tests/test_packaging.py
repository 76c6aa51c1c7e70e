"""The one import root, as installed: the package list, the wheel, and a user project with its own ``models/``."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def source_packages() -> set[str]:
    """Every folder with an __init__.py under the mapped folders, by its installed name."""
    names = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            names.add(".".join((package, *init.parent.relative_to(ROOT / folder).parts)))
    return names


def test_the_package_list_names_every_package_folder():
    assert set(SETUPTOOLS["packages"]) == source_packages()
    assert all(name == "sparse_index_jax" or name.startswith("sparse_index_jax.") for name in SETUPTOOLS["packages"])


def test_the_wheel_installs_one_root_and_a_project_with_its_own_models_package_runs_the_quickstart(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", "results", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, text=True)
    wheel = next((tmp_path / "dist").glob("sparse_index_jax-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
    tops = {name.split("/")[0] for name in files if ".dist-info/" not in name}
    assert tops == {"sparse_index_jax"}, tops
    for package, folder in SETUPTOOLS["package-dir"].items():  # every module of every mapped folder is in it
        for path in (ROOT / folder).rglob("*.py"):
            assert "/".join((*package.split("."), *path.relative_to(ROOT / folder).parts)) in files, path
    assert "sparse_index_jax/models/weights/smollm2_135m_indexers.safetensors" in files

    site, project = tmp_path / "site", tmp_path / "project"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("MINE = True\n")
    quickstart = re.search(r"## Quickstart\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    script = quickstart + f"""
import importlib.util, models, sparse_index_jax
assert models.MINE, "the project's own models package"
assert sparse_index_jax.__file__.startswith({str(site)!r}), sparse_index_jax.__file__
assert importlib.util.find_spec("pallas_kernels") is None and importlib.util.find_spec("bench") is None
from sparse_index_jax.models.retrofit import SMOLLM2_INDEXERS
assert SMOLLM2_INDEXERS.is_file()
print("quickstart ran", sel.indices.shape)
"""
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quickstart ran (2, 512, 64)" in done.stdout
