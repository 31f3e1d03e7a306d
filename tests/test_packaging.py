"""Packaging: kernels/ and pipelines/ ship as vidaccel.kernels and vidaccel.pipelines, never as
top-level packages (diffusers imports an unrelated PyPI package named ``kernels``), both from a
built wheel and from the editable install."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vidaccel

REPO = Path(__file__).resolve().parents[1]
# What a copy of the source tree leaves out: VCS data, environments and build leftovers (a stale
# build/lib would leak deleted files into the wheel).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"
)
_SUBPACKAGES = ("kernels", "pipelines")

_IMPORT_PROBE = """
import importlib, importlib.util, json, sys
names = sys.argv[1:]
found = {name: importlib.import_module(name).__file__ for name in names}
spec = importlib.util.find_spec("kernels")
found["top_level_kernels"] = None if spec is None else spec.origin
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build a wheel from a clean copy of the source tree, without build isolation."""
    missing = _missing_build_requirements()
    if missing:
        pytest.fail(f"building the wheel without isolation needs {missing} here (`make test` installs them)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    dist = root / "dist"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(source),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"wheel build failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(dist.glob("vidaccel-*.whl"))
    assert len(wheels) == 1, (
        f"expected one vidaccel wheel in {dist}, found {[w.name for w in dist.iterdir()]}"
    )
    return wheels[0]


def test_wheel_ships_subpackages_only_under_vidaccel(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for sub in _SUBPACKAGES:
        assert f"vidaccel/{sub}/__init__.py" in names, f"vidaccel/{sub}/ missing from {wheel.name}"
        assert not any(n.startswith(f"{sub}/") for n in names), (
            f"{wheel.name} installs a top-level {sub}/ package"
        )
    top_level = {n.split("/", 1)[0] for n in names}
    unexpected = {t for t in top_level if t != "vidaccel" and not t.endswith(".dist-info")}
    assert not unexpected, f"{wheel.name} installs top-level entries besides vidaccel: {sorted(unexpected)}"


def test_installed_wheel_imports_subpackages_from_itself(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # The unpacked wheel goes first on sys.path, ahead of the editable install's finder.
    found = _probe(["vidaccel", "vidaccel.kernels", "vidaccel.pipelines"], cwd=tmp_path, pythonpath=site)
    for name in ("vidaccel", "vidaccel.kernels", "vidaccel.pipelines"):
        assert Path(found[name]).resolve().is_relative_to(site.resolve()), (
            f"{name} imported from {found[name]}"
        )
    _assert_no_top_level_kernels_from(found, site)


def test_editable_install_maps_subpackages_to_repo_folders(tmp_path):
    if not Path(vidaccel.__file__).resolve().is_relative_to(REPO):
        pytest.skip(
            f"vidaccel is not installed editable from this checkout (imported from {vidaccel.__file__})"
        )
    # Run outside the checkout so the current directory cannot shadow the installed finder.
    found = _probe(["vidaccel.kernels", "vidaccel.pipelines"], cwd=tmp_path)
    for sub in _SUBPACKAGES:
        assert Path(found[f"vidaccel.{sub}"]).resolve() == REPO / sub / "__init__.py"
    _assert_no_top_level_kernels_from(found, REPO)


def _probe(names, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, *names],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"import failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_no_top_level_kernels_from(found, root):
    origin = found["top_level_kernels"]
    assert origin is None or not Path(origin).resolve().is_relative_to(root.resolve()), (
        f"`import kernels` resolves to our folder {origin}; it must only be vidaccel.kernels"
    )


def _missing_build_requirements():
    """The build-system requirements of pyproject.toml (setuptools>=69, wheel) absent here."""
    missing = []
    for dist, minimum in (("setuptools", 69), ("wheel", 0)):
        try:
            major = int(importlib.metadata.version(dist).split(".")[0])
        except importlib.metadata.PackageNotFoundError:
            major = -1
        if major < minimum:
            missing.append(f"{dist}>={minimum}" if minimum else dist)
    return missing
