"""What every stage shares: user-facing errors and outputs that appear whole or not at all."""

import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class StageError(Exception):
    """A failure the user can fix (bad params, bad data); shown without a traceback."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed onto `path` only if the block succeeds.

    The temporary name keeps `path`'s suffix (numpy and Keras choose the format from it) and
    starts with ".tmp-", so nothing that reads `path` can mistake a half-written file for it.
    Leftovers of a killed run are removed on the next write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-*-{path.name}"):
        _remove(stale)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextmanager
def all_or_nothing(*outputs: Path) -> Iterator[None]:
    """Remove a stage's `outputs` if the block fails or is interrupted (Ctrl-C), so that the
    stage leaves all of its outputs or none of them."""
    try:
        yield
    except BaseException:
        for output in outputs:
            _remove(Path(output))
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def run(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)`; user errors print one line and exit 1; Ctrl-C, or a SIGTERM
    (a CI job cancelled, a `kill`), leaves no half-written output and exits 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(sys.argv[1:])
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
