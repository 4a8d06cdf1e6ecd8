"""requirements.lock installs, with its hashes, on every platform and Python it is meant for: a dry
run of uv for each pair (it reads the package index, and is skipped where that cannot be reached)."""

import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support import load_tasks

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PLATFORMS = ("x86_64-manylinux_2_28", "aarch64-manylinux_2_28", "aarch64-apple-darwin", "x86_64-pc-windows-msvc")
PYTHONS = ("3.11", "3.12", "3.13")
# The locked packages published as source alone (pure Python: they build anywhere); every other
# one must have a wheel for the platform.
SOURCE_ONLY = ("antlr4-python3-runtime",)


def index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_requires_python_is_the_pythons_the_lock_is_checked_for():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={PYTHONS[0]},<3.{int(PYTHONS[-1].split('.')[1]) + 1}"
    lock = load_tasks().COMMANDS["lock"]
    assert "--universal" in lock and lock[lock.index("--python-version") + 1] == PYTHONS[0]


@pytest.mark.skipif(not index_reachable(), reason="the dry runs read pypi.org, which cannot be reached from here")
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_lock_installs_with_its_hashes_from_wheels(platform, python, tmp_path):
    planned = subprocess.run(
        [str(Path(sys.executable).parent / "uv"), "pip", "install", "--dry-run", "--require-hashes",
         "--only-binary", ":all:", "--no-binary", ",".join(SOURCE_ONLY), "-r", str(LOCK),
         "--python-platform", platform, "--python-version", python, "--target", str(tmp_path / "target")],
        capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr
    locked = {line.split("==")[0] for line in LOCK.read_text().splitlines() if re.match(r"^[a-z0-9]", line)}
    would_install = {re.sub(r"^ \+ ([^=]+)==.*", r"\1", line) for line in planned.stderr.splitlines()
                     if line.startswith(" + ")}
    assert would_install and would_install <= locked  # the lock's pins, those for the platform
