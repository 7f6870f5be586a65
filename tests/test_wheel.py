"""The package installs as a wheel and works outside the repository: built-in tasks ship inside it."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_subpackage():
    text = (ROOT / "pyproject.toml").read_text()
    listed = ast.literal_eval(text.split("packages = ", 1)[1].split("]", 1)[0] + "]")
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lmcoh").rglob("__init__.py"))
    assert sorted(listed) == sorted(found + ["lmcoh.tasks.builtin"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a fresh folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    python = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*python, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp)
    wheel, = (tmp / "dist").glob("lmcoh-*.whl")
    subprocess.run([*python, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, cwd=tmp)
    return tmp


def _lmcoh(installed: Path, *argv) -> subprocess.CompletedProcess:
    """``python -m lmcoh ARGV`` with the installed wheel first on the path, run from an empty folder."""
    work = installed / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    return subprocess.run([sys.executable, "-m", "lmcoh", *argv], capture_output=True, text=True, cwd=work, env=env)


@pytest.mark.slow  # builds a wheel: about ten seconds
def test_a_wheel_install_works_outside_the_repository(installed):
    where = subprocess.run([sys.executable, "-c", "import lmcoh; print(lmcoh.__file__)"], capture_output=True,
                           text=True, cwd=installed, env={**os.environ, "PYTHONPATH": str(installed / "site")})
    assert where.stdout.startswith(str(installed / "site"))
    import lmcoh

    version = _lmcoh(installed, "--version")  # one version: the wheel's metadata reads lmcoh.__version__
    assert version.stdout == f"lmcoh {lmcoh.__version__}\n"
    assert [p.name for p in (installed / "dist").glob("*.whl")] == [f"lmcoh-{lmcoh.__version__}-py3-none-any.whl"]
    tasks = _lmcoh(installed, "tasks")
    assert tasks.returncode == 0 and "mountain_race" in tasks.stdout and "slippery_grid" in tasks.stdout
    exact = _lmcoh(installed, "exact", "mountain_race", "--json", "--steps", "1")
    assert exact.returncode == 0, exact.stderr
    study = _lmcoh(installed, "study", "--quick", "--output_dir", "study")
    assert study.returncode == 0, study.stderr[-2000:]
    assert (installed / "work" / "study" / "study.json").is_file()
    code = ("from lmcoh.runs import temperature; from lmcoh.tasks.library import load_task; "
            "print(temperature.exact_comparison(load_task('lottery'), 2)['success']['retrain'][2])")
    comparison = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=installed / "work",
                                env={**os.environ, "PYTHONPATH": str(installed / "site")})
    assert comparison.returncode == 0, comparison.stderr
    assert 0 < float(comparison.stdout) <= 1
