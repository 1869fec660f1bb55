"""A plain ``pip install .`` works from any folder, the repository root included, where the source folder
``deleaker/`` comes first on sys.path and its subpackages live beside it (pyproject's package-dir)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_WHERE = "import deleaker.runtime.cli, deleaker.export.limits; print(deleaker.runtime.cli.__file__)"


def _python(code: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_checkout_root_imports_its_own_subpackages():
    """Without an install that maps them (editable installs of this or another checkout are set aside), the
    subpackages are found beside ``deleaker/``."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n" + _WHERE
    )
    done = _python(code, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip().splitlines()[-1]) == ROOT / "runtime" / "cli" / "__init__.py"


@pytest.mark.slow
def test_a_plain_install_imports_from_the_root_and_from_elsewhere(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    if install.returncode != 0 and "invalid command 'bdist_wheel'" in install.stderr:
        pytest.skip("this setuptools cannot build a wheel without the wheel package (and the index is offline)")
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, home in ((ROOT, ROOT), (elsewhere, target / "deleaker")):
        done = _python(_WHERE, cwd, pythonpath=str(target))
        assert done.returncode == 0, done.stderr[-3000:]
        assert Path(done.stdout.strip().splitlines()[-1]).is_relative_to(home)
