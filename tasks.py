"""The README's commands, with or without `make` (Windows PowerShell has none):

    python tasks.py pipeline    (make pipeline)  run the whole pipeline: dvc repro
    python tasks.py test        (make test)      run the tests
    python tasks.py lock        (make lock)      refresh requirements.lock after a change to pyproject.toml
    python tasks.py env         (make env)       only set up the environment

Each first creates the virtual environment .venv with the exact versions (and hashes) of
requirements.lock, where it is missing or older than requirements.lock or pyproject.toml, and
runs its command with .venv's programs first on the PATH. Needs only Python's standard library.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
INSTALLED = VENV / "installed"  # touched once .venv holds what the files below pin
PINNED_BY = (ROOT / "requirements.lock", ROOT / "pyproject.toml")
COMMANDS = {
    "pipeline": ["dvc", "repro"],
    "test": ["pytest", "-n", "auto", "--dist", "loadfile", "--no-loadscope-reorder"],
    "lock": ["uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--universal", "--python-version", "3.11",
             "--generate-hashes", "--custom-compile-command", "make lock", "--quiet", "-o", "requirements.lock"],
    "env": [],
}


def up_to_date() -> bool:
    return INSTALLED.is_file() and all(INSTALLED.stat().st_mtime >= path.stat().st_mtime for path in PINNED_BY)


def set_up() -> None:
    """.venv with requirements.lock's versions, checked against its hashes, and this project."""
    python = str(BIN / "python")
    for command in ([sys.executable, "-m", "venv", str(VENV)],
                    [python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                    [python, "-m", "pip", "install", "--quiet", "--require-hashes", "-r", str(PINNED_BY[0])],
                    [python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)]):
        subprocess.run(command, check=True)
    INSTALLED.touch()


def run(command: list[str]) -> int:
    """Run `command` with .venv's programs first on the PATH, to its end: a Ctrl-C reaches it from
    the console too, and it stops in its own way; a SIGTERM to this process is passed on to it."""
    environment = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=ROOT, env=environment)
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    if not up_to_date():
        set_up()
    return run(COMMANDS[argv[0]]) if COMMANDS[argv[0]] else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(f"error: `{' '.join(map(str, err.cmd))}` failed (exit code {err.returncode})")
    except KeyboardInterrupt:  # while setting up .venv: run again to finish it
        sys.exit(130)
