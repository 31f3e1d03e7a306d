"""Packaging: kernels/ and pipelines/ ship as vidaccel.kernels and vidaccel.pipelines, never as
top-level packages (transformers imports an unrelated PyPI package named ``kernels``), both from a
built wheel and from the editable install; from the repository root ``kernels`` is the PyPI package;
a wheel in a fresh venv carries the shipped world models and runs the rollout demo."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
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


_SHADOW_PROBE = """
import json, sys
import transformers, diffusers.loaders.peft, vidaccel, vidaccel.kernels
import kernels
print(json.dumps({"kernels": kernels.__file__, "vidaccel.kernels": vidaccel.kernels.__file__,
                  "has_plan": hasattr(vidaccel.kernels, "plan_blocks")}))
"""


def test_repository_root_does_not_shadow_the_pypi_kernels_package():
    # What `python -m pytest` and `python` opened in the checkout do: the root is on sys.path, as ''
    # (the working directory) and as an explicit entry.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", _SHADOW_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"imports failed from the repository root:\n{result.stderr[-3000:]}"
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert not Path(found["kernels"]).resolve().is_relative_to(REPO / "kernels"), (
        f"`import kernels` resolves into this repository ({found['kernels']}); it must be the PyPI package"
    )
    assert Path(found["vidaccel.kernels"]).resolve() == (
        Path(vidaccel.__file__).resolve().parents[1] / "kernels" / "__init__.py"
        if Path(vidaccel.__file__).resolve().is_relative_to(REPO)
        else Path(found["vidaccel.kernels"]).resolve()
    )
    assert found["has_plan"]


_ABSENT_PROBE = """
import importlib, json
package = importlib.import_module("kernels")  # what transformers does when find_spec finds the folder
looks_absent = getattr(package, "__version__", "N/A") == "N/A" and getattr(package, "__file__", None) is None
try:
    from kernels import get_kernel
    error = None
except ImportError as caught:
    error = f"{type(caught).__name__}: {caught}"
try:
    import kernels.plan
    submodule = kernels.plan.__file__
except ImportError:
    submodule = None
print(json.dumps({"looks_absent": looks_absent, "error": error, "submodule": submodule}))
"""


def test_kernels_without_the_pypi_package_is_an_absent_placeholder():
    # -S: no site-packages, so no PyPI `kernels`; the repository root is the working directory. The
    # name must look absent to dependency probes (transformers imports a package that find_spec finds
    # and has no version metadata), must not expose our kernels, and must say why on use.
    result = subprocess.run(
        [sys.executable, "-S", "-c", _ABSENT_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["looks_absent"]
    assert found["submodule"] is None, (
        f"our kernels load as top-level `kernels.plan` from {found['submodule']}"
    )
    assert found["error"] and found["error"].startswith("ModuleNotFoundError")
    assert "vidaccel.kernels" in found["error"] and "pip install kernels" in found["error"]


_WHEEL_ASSETS = (
    "level_frame_ranges.json",
    *(
        f"{model}/{name}"
        for model in ("world_model", "world_model_long")
        for name in ("config.json", "diffusion_pytorch_model.safetensors", "world_model.json")
    ),
)


def test_wheel_ships_the_world_models_as_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in _WHEEL_ASSETS if f"vidaccel/assets/{name}" not in names]
    assert not missing, f"{wheel.name} lacks vidaccel/assets/ {missing}"
    shipped = {n.removeprefix("vidaccel/assets/") for n in names if n.startswith("vidaccel/assets/")}
    assert shipped == set(_WHEEL_ASSETS), (
        f"unexpected assets in the wheel: {sorted(shipped - set(_WHEEL_ASSETS))}"
    )


_LOAD_PROBE = """
import json, sys
from pathlib import Path
import vidaccel
from vidaccel.pipelines import LONG_WORLD_MODEL, WorldModelPipeline
shipped = WorldModelPipeline.from_pretrained_world_model(device="cpu")
long = WorldModelPipeline.from_pretrained_world_model(LONG_WORLD_MODEL, device="cpu")
print(json.dumps({"vidaccel": vidaccel.__file__, "long": str(LONG_WORLD_MODEL),
                  "shift": [shipped.metadata["shift"], long.metadata["shift"]],
                  "parameters": sum(p.numel() for p in long.transformer.parameters())}))
"""


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory):
    """A fresh venv holding vidaccel only as the built wheel. Its dependencies are this environment's
    site-packages, added by a .pth path entry (whose own .pth files, the editable install's finder
    among them, are not processed), so that the test needs no download."""
    venv = tmp_path_factory.mktemp("wheel_venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "vidaccel_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python, Path(site)


def _run_in_venv(python, *args, cwd):
    """``python *args`` in ``cwd`` without this environment's PYTHONPATH; asserts it succeeded."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(python), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_wheel_in_a_fresh_venv_loads_every_shipped_world_model(wheel_venv, tmp_path):
    python, site = wheel_venv
    printed = _run_in_venv(python, "-c", _LOAD_PROBE, cwd=tmp_path)
    found = json.loads(printed.strip().splitlines()[-1])
    assert Path(found["vidaccel"]).resolve().is_relative_to(site.resolve()), found["vidaccel"]
    assert Path(found["long"]).resolve().is_relative_to(site.resolve()), found["long"]
    assert found["shift"] == [
        json.loads((REPO / "assets" / m / "world_model.json").read_text())["shift"]
        for m in ("world_model", "world_model_long")
    ]
    assert found["parameters"] > 1_000_000


def test_rollout_demo_runs_from_outside_the_repository_on_the_wheel(wheel_venv, tmp_path):
    python, site = wheel_venv
    out = tmp_path / "out"
    _run_in_venv(
        python, REPO / "demos" / "world_model_rollout.py", "--frames", "2", "--out", out, cwd=tmp_path
    )
    report = json.loads((out / "report.json").read_text())
    # The default model is the wheel's copy of the best shipped model, and every method ran 2 frames.
    assert Path(report["model"]["path"]).resolve().is_relative_to(site.resolve()), report["model"]["path"]
    assert Path(report["model"]["path"]).name == "world_model_long"
    assert report["settings"]["frames"] == 2 and report["methods"]
    assert (out / report["files"]["video"]).is_file()


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
    _assert_no_top_level_kernels_from(found, REPO / "kernels")


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
