"""dppo installs as a package: ``python -m build`` makes an sdist and a wheel, and the wheel, installed into a clean
venv with nothing but its declared dependencies (torch, pinned to the version installed here, as
scripts/bootstrap.sh pins it), runs ``dppo demo`` and exposes verl's plug-in entry point, whose module is in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("build")  # the `test` extra installs it

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINT = """
import warnings
from importlib.metadata import entry_points
(ep,) = [e for e in entry_points(group="verl.plugins") if e.name == "dppo"]
print(ep.value)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ep.load()  # verl is not installed here: the plug-in must say so, not fail silently
print(" | ".join(str(w.message) for w in caught))
"""


def test_build_makes_sdist_and_wheel_that_installs_and_runs_in_a_clean_venv(tmp_path):
    dist, tree = tmp_path / "dist", tmp_path / "tree"
    # what the build reads, copied: building in the checkout would leave src/dppo.egg-info beside the editable install
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # --no-isolation: the build backend (setuptools >= 77) from this venv, no download at test time
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(tree)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("dppo-*-py3-none-any.whl")
    (sdist,) = dist.glob("dppo-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dppo/data/sample_math.jsonl", "dppo/integrations/verl_plugin.py", "dppo/integrations/trl.py"} <= names
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "src/dppo/data/sample_math.jsonl"} <= members

    venv = tmp_path / "clean"  # without pip of its own (3 s less): this venv's pip installs into it (--python)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile",
           "--disable-pip-version-check"]
    constraints = tmp_path / "constraints.txt"  # as scripts/bootstrap.sh: torch pinned to the build installed here
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    pip += ["-c", str(constraints)]
    subprocess.run(pip + [str(wheel)], check=True, capture_output=True, text=True, timeout=600)

    demo = subprocess.run([str(venv / "bin" / "dppo"), "demo"], check=True, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    row = next(line for line in demo.stdout.splitlines() if line.startswith("common token falls"))
    assert row.split()[-6:-3] == ["kept", "masked", "masked"]  # as tests/test_demo.py, from the installed wheel

    ep = subprocess.run([str(venv / "bin" / "python"), "-c", ENTRY_POINT], check=True, capture_output=True,
                        text=True, timeout=120, cwd=tmp_path)
    value, warned = ep.stdout.splitlines()
    assert value == "dppo.integrations.verl_plugin"
    assert "dppo's verl plug-in failed to import" in warned and "needs verl" in warned, warned
