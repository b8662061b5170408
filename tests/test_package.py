"""The package itself: one version string, a quiet logger, and sample photos that every
kind of install finds (package data through importlib.resources; the slow test builds the
wheel and runs it from a fresh venv and from a `pip install --user`)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import ckptinit
from ckptinit.data import samples_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(ckptinit.__file__).resolve().parent
RUN = ["rescale", "test_resnet", "-o", "out.safetensors", "--report", "r.json", "--device",
       "cpu", "--input-size", "32", "--images", "8", "--holdout", "4", "--batch-size", "8",
       "--grad-batches", "1", "-q"]


def test_one_version_string_from_the_metadata():
    assert ckptinit.__version__ == importlib.metadata.version("ckptinit")
    literal = re.compile(r"""__version__\s*=\s*["']\d+\.\d+""")  # a release number
    assert not [p for p in PACKAGE.rglob("*.py") if literal.search(p.read_text())]


def test_library_logging_is_silent_unless_configured():
    code = "import logging, ckptinit; logging.getLogger('ckptinit.api').warning('library says')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""


def _setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _installed_paths() -> dict[Path, str]:
    """Every file the package data globs install, by its path in the tree -> its package."""
    config = _setuptools_config()
    dirs = config.get("package-dir", {})
    out = {}
    for package, globs in config["package-data"].items():
        folder = ROOT / dirs.get(package, package.replace(".", "/"))
        for glob in globs:
            out.update({p.resolve(): package for p in folder.glob(glob)})
    return out


def test_samples_live_at_the_top_and_install_as_package_data():
    folder = samples_dir()
    assert folder.resolve() == ROOT / "samples"
    photos = sorted(folder.glob("*.jpg"))
    assert len(photos) == 13
    installed = _installed_paths()
    for path in [*photos, folder / "README.md"]:
        assert installed.get(path.resolve()) == "ckptinit.samples", f"{path} would not install"


def test_the_package_list_names_every_package_of_the_tree():
    """pyproject.toml lists the packages (samples/ maps onto ckptinit.samples), so a new
    sub-package must be added there or it would be left out of the wheel."""
    config = _setuptools_config()
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "ckptinit").rglob("__init__.py")}
    found |= {pkg for pkg, folder in config.get("package-dir", {}).items()
              if (ROOT / folder / "__init__.py").is_file()}
    assert set(config["packages"]) == found


MAX_MODULE_LINES = 450  # ARCHITECTURE.md: "No file under ckptinit/ above 450 lines"


def test_no_module_is_longer_than_the_architecture_allows():
    """A module that outgrows the rule holds more than one concern: split it by concern
    (scales.py -> ops.py, between.py -> update.py) rather than raise the limit."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules above {MAX_MODULE_LINES} lines: {long}"


def _copy_source(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ruff_cache")
    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


def _build_wheel(tmp: Path) -> Path:
    """The wheel, built offline by the running interpreter's setuptools (PEP 517)."""
    src = _copy_source(tmp / "src")
    dist = tmp / "dist"
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(dist)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=src, check=True, capture_output=True,
                   timeout=300)
    return next(dist.glob("ckptinit-*.whl"))


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, cwd=cwd, env={**clean, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_samples_run(folder: Path, site: Path) -> None:
    import json

    assert (folder / "out.safetensors").stat().st_size > 0
    data = json.loads((folder / "r.json").read_text())["data"]
    assert data["kind"] == "samples" and data["distinct_sources"] == 12
    assert Path(data["resolved"]).is_relative_to(site), data["resolved"]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_and_with_pip_user_runs_on_the_samples(tmp_path):
    """The wheel goes into a fresh venv (the dependencies, torch included, are taken from
    this environment through a .pth line rather than downloaded again) and into a
    `--user` site; both run `rescale` on the default samples, which they find inside their
    own install."""
    wheel = _build_wheel(tmp_path)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "_ckptinit_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path, {})
    work = tmp_path / "venv-run"
    work.mkdir()
    _run([str(venv / "bin" / "ckptinit"), *RUN], work, {})
    _check_samples_run(work, site)

    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if subprocess.run([base, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip(f"{base} has no pip for the --user install")
    user = tmp_path / "userbase"
    env = {"PYTHONUSERBASE": str(user), "PYTHONNOUSERSITE": ""}
    _run([str(base), "-m", "pip", "install", "--user", "--no-deps", "--no-index", "-q",
          "--no-warn-script-location", str(wheel)], tmp_path, env)
    work = tmp_path / "user-run"
    work.mkdir()
    env["PYTHONPATH"] = os.pathsep.join(sorted(deps))  # dependencies only: no ckptinit there
    _run([str(user / "bin" / "ckptinit"), *RUN], work, env)
    _check_samples_run(work, user)
