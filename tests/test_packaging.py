"""The one import root, as installed: the package list, the wheel, and a user project with its own ``models/``."""

from __future__ import annotations

import ast
import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
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


def package_version() -> str:
    """``sparse_index_jax.__version__``, read from the file (as setuptools does)."""
    tree = ast.parse((ROOT / "sparse_index_jax" / "__init__.py").read_text())
    (value,) = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(target, "id", None) for target in node.targets] == ["__version__"]]
    return value


def check_metadata(text: str) -> None:
    """A built distribution's core metadata: the one version, the license, the base dependencies, the URLs."""
    fields = email.parser.HeaderParser().parsestr(text)
    assert fields["Version"] == package_version()
    assert fields["License-Expression"] == "Apache-2.0" and fields.get_all("License-File") == ["LICENSE"]
    requires = {re.split(r"[ ;<>=!~\[]", line, maxsplit=1)[0].lower() for line in fields.get_all("Requires-Dist")
                if "extra ==" not in line}
    assert {"jax", "flax", "matplotlib", "jinja2"} <= requires, requires
    urls = dict(line.split(", ", 1) for line in fields.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Repository", "Issues", "Documentation"}, urls
    assert "Programming Language :: Python :: 3.13" in fields.get_all("Classifier")


def test_the_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "sparse_index_jax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", package_version())


def test_the_sdist_carries_the_license_and_its_build_does_not_import_jax(tmp_path):
    fake = tmp_path / "fake" / "jax"  # setuptools must read __version__ from the file, not import the package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the build imported jax')\n")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", "results", ".pytest_cache",
                                                             "sparse-index-runs", "weights"))
    build = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist = tmp_path / "dist" / done.stdout.split()[-1]
    with tarfile.open(sdist) as tf:
        top = sdist.name.removesuffix(".tar.gz")
        assert tf.extractfile(f"{top}/LICENSE").read() == (ROOT / "LICENSE").read_bytes()
        check_metadata(tf.extractfile(f"{top}/PKG-INFO").read().decode())


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
    with zipfile.ZipFile(wheel) as zf:
        info = next(name.rpartition("/")[0] for name in files if name.endswith(".dist-info/METADATA"))
        check_metadata(zf.read(f"{info}/METADATA").decode())
        assert zf.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()

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
