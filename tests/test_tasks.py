"""tasks.py, the README's commands with or without `make`: it sets .venv up from the lock only when
the lock or pyproject.toml is newer than the set-up, and make runs it."""

import os
import subprocess
import sys
from pathlib import Path

from support import load_tasks

ROOT = Path(__file__).resolve().parents[1]
tasks = load_tasks()


def test_the_environment_is_set_up_again_only_after_the_lock_or_pyproject_changes(tmp_path, monkeypatch):
    lock, pyproject, installed = tmp_path / "requirements.lock", tmp_path / "pyproject.toml", tmp_path / "installed"
    monkeypatch.setattr(tasks, "PINNED_BY", (lock, pyproject))
    monkeypatch.setattr(tasks, "INSTALLED", installed)
    for path in (lock, pyproject):
        path.touch()
        os.utime(path, (1000, 1000))
    assert not tasks.up_to_date()  # never set up
    installed.touch()
    os.utime(installed, (2000, 2000))
    assert tasks.up_to_date()
    os.utime(pyproject, (3000, 3000))
    assert not tasks.up_to_date()


def test_make_and_tasks_py_run_the_same_commands():
    makefile = (ROOT / "Makefile").read_text()
    assert f"{' '.join(tasks.COMMANDS)}:\n\t$(PYTHON) tasks.py $@" in makefile
    usage = subprocess.run([sys.executable, str(ROOT / "tasks.py"), "deploy"], capture_output=True, text=True)
    assert usage.returncode == 2 and "python tasks.py pipeline" in usage.stderr
