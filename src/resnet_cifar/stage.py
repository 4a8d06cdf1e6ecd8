"""What every stage shares: user-facing errors, outputs that appear whole or not at all, and stop
requests that take effect within seconds and are never lost.

A stop request is Ctrl-C (SIGINT), SIGTERM (a CI job cancelled, a `kill`, `timeout`) or the end of
the process that started the stage (`dvc repro` killed: DVC passes no signal on to its stage). In
ordinary code it raises KeyboardInterrupt at once. Inside `interrupts_at_boundaries()` (training
and prediction loops, whose calls into the backend last about a second) it is only recorded, and
the loop raises it at its next boundary (`check_interrupt`), from ordinary code: Python runs a
signal handler wherever the main thread is, and an exception raised there inside a garbage-collector
callback or a `__del__` is printed as "Exception ignored" and dropped. A request that a stage still
missed is raised when its outputs are about to be kept (`all_or_nothing`). A second request ends
the process at once, from a thread that also runs while the main thread is inside the backend.
"""

import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

INTERRUPTED = 130  # the exit code of a process ended by Ctrl-C, as shells report it
PARENT_POLL_SECONDS = 1.0
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}


class StageError(Exception):
    """A failure the user can fix (bad params, bad data); shown without a traceback."""


class _StopRequests:
    """This process's stop requests, and what acting on them needs to know."""

    def __init__(self):
        self.requested = threading.Event()
        self.at_boundaries = 0  # depth of interrupts_at_boundaries() blocks: record, don't raise
        # Whether ordinary code has raised for the request. The watch thread records a signal as it
        # arrives, so a boundary can raise before Python runs the handler, which must not raise
        # again then: its KeyboardInterrupt would land in the cleanup or in `run`'s exit.
        self.acted_on = False
        self.outputs: list[Path] = []  # the running all_or_nothing block's, removed by a forced stop
        self.wakeups: socket.socket | None = None  # where Python's C-level handler reports each signal


_STOP = _StopRequests()


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
    """Remove a stage's `outputs` if the block fails or is interrupted, so that the stage leaves
    all of its outputs or none of them. Name the files and folders the stage writes, not a folder
    that also holds files git tracks (DVC's .gitignore beside its outputs)."""
    _STOP.outputs = [Path(output) for output in outputs]
    try:
        yield
        check_interrupt()  # a request the block did not act on: its outputs are not kept either
    except BaseException:
        for output in _STOP.outputs:
            _remove(output)
        raise
    finally:
        _STOP.outputs = []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a stop was requested: call it at a loop's boundaries."""
    if _STOP.requested.is_set():
        _STOP.acted_on = True
        raise KeyboardInterrupt


@contextmanager
def interrupts_at_boundaries() -> Iterator[None]:
    """Within the block a stop request is only recorded; the block acts on it by calling
    check_interrupt between its steps."""
    _STOP.at_boundaries += 1
    try:
        yield
    finally:
        _STOP.at_boundaries -= 1


def _on_signal(signum: int, frame) -> None:
    _STOP.requested.set()
    if not _STOP.at_boundaries and not _STOP.acted_on:
        _STOP.acted_on = True
        raise KeyboardInterrupt


def _stop_now() -> None:
    """A second request: remove the running block's outputs and end the process at once."""
    for output in _STOP.outputs:
        _remove(output)
    print("interrupted again: stopped at once, no output was written", flush=True)
    os._exit(INTERRUPTED)


def _parent_of(pid: int) -> int | None:
    """The parent of process `pid`, where the system tells (Linux's /proc)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _starters() -> list[tuple[int, int | None]]:
    """The processes whose end ends the stage, each with its parent at the start: the stage's
    parent, and the parent's parent when the parent is a shell that only runs the stage (DVC
    runs each stage as `$SHELL -c <cmd>`, and dash does not replace itself by the command)."""
    parent = os.getppid()
    try:
        shell = Path(Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0].decode()).name
    except (OSError, UnicodeDecodeError):
        shell = ""
    starters = [(os.getpid(), parent)]
    if "DVC_STAGE" in os.environ and shell in SHELLS:
        starters.append((parent, _parent_of(parent)))
    return starters


def _watch(wakeups: socket.socket, starters: list[tuple[int, int | None]]) -> None:
    """Count the signals that Python's C-level handler reports on `wakeups` and end the process
    on the second; once a starter has ended (its child was handed to another parent), send this
    process a SIGTERM, acted on as any other request."""
    received = 0
    wakeups.settimeout(PARENT_POLL_SECONDS)
    while True:
        try:
            received += len(wakeups.recv(16))
        except TimeoutError:
            if starters and any((os.getppid() if pid == os.getpid() else _parent_of(pid)) != parent
                                for pid, parent in starters):
                print("the process that started this stage has ended: stopping", flush=True)
                starters = []
                signal.raise_signal(signal.SIGTERM)
            continue
        _STOP.requested.set()
        if received > 1:
            _stop_now()


def listen_for_stop_requests() -> None:
    """Handle SIGINT and SIGTERM as stop requests, and watch for a second one and for the end of
    the process that started the stage. A stage calls it first thing (resnet_cifar/__init__.py):
    a request during its imports is recorded and acted on when `run` starts the stage."""
    receiver, _STOP.wakeups = socket.socketpair()  # kept: closing it would end the watch
    _STOP.wakeups.setblocking(False)
    signal.set_wakeup_fd(_STOP.wakeups.fileno(), warn_on_full_buffer=False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    threading.Thread(target=_watch, args=(receiver, _starters()), daemon=True, name="stop-requests").start()
    _STOP.at_boundaries += 1  # until run() starts the stage


def run(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)`; user errors print one line and exit 1; a stop request (Ctrl-C,
    SIGTERM, the end of the process that started the stage) leaves no half-written output and
    exits 130."""
    if _STOP.wakeups is None:
        listen_for_stop_requests()
    try:
        _STOP.at_boundaries -= 1  # from here on, a request raises at once in ordinary code
        check_interrupt()
        main(sys.argv[1:])
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(INTERRUPTED)
