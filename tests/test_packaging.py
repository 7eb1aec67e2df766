"""The wheel is complete: built, installed into a fresh virtual environment, ``vist2 demo`` runs from it.

Nothing is downloaded: the wheel is built with the setuptools already installed (no build isolation),
installed with ``--no-deps --no-index``, and the new environment sees this environment's packages
(torch, transformers ...) through a ``.pth`` line, after its own site-packages, so ``vist2`` itself
comes from the wheel and nowhere else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo(tmp_path):
    # built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = dist.glob("vist2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vist2/py.typed", "vist2/data/sample_en.txt", "vist2/data/sample_zh.txt",
            "vist2/models/vist2-nano/model.safetensors", "vist2/models/vist2-nano/config.json"} <= names
    assert wheel.stat().st_size < 32e6  # the shipped nano model (16 MB) and the code, nothing else

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                              "--ignore-installed", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # then this environment's packages, after the new one's own: the dependencies without a download
    # (added after the install, so pip never sees this environment's own vist2)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([str(py), "-c", "import vist2, os; print(os.path.realpath(vist2.__file__))"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv.resolve())), where  # the installed wheel, not the source tree
    demo = subprocess.run([str(venv / "bin" / "vist2"), "demo", "--out", str(tmp_path / "demo")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "1. layout:" in demo.stdout and (tmp_path / "demo" / "chunk0.png").is_file()
    assert "the nano model trained from scratch" in demo.stdout  # the shipped model, not a random one
