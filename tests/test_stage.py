"""What every stage shares (stage.py): outputs written whole or not at all, and a stop request
acted on once."""

import subprocess
import sys

import pytest

from resnet_cifar.stage import all_or_nothing, atomic_path


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".tmp-99999-out.json"
    stale.write_text("left by a killed run")
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and target.read_text() == "whole"


def test_all_or_nothing_removes_every_output_of_an_interrupted_stage(tmp_path):
    figures, summary = tmp_path / "figures", tmp_path / "summary.json"
    with pytest.raises(KeyboardInterrupt):
        with all_or_nothing(figures, summary):
            figures.mkdir()
            (figures / "a.png").write_bytes(b"png")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with all_or_nothing(figures, summary):
        summary.write_text("{}")
    assert summary.read_text() == "{}"


# A stop request that a boundary acts on before Python runs the signal's handler: the watch thread
# records a signal as it arrives, so ordinary code can raise first; the handler then runs late,
# here as `run` prints its last line, and must not raise a second KeyboardInterrupt (which would
# end the process by SIGINT instead of with exit code 130, or cut a cleanup short).
LATE_HANDLER = """
import builtins
import signal
from resnet_cifar import stage

printed = builtins.print


def print_then_run_the_late_handler(*args, **kwargs):
    printed(*args, **kwargs)
    stage._on_signal(signal.SIGINT, None)


builtins.print = print_then_run_the_late_handler


def main(argv):
    stage._STOP.requested.set()  # as the watch thread does when the signal arrives
    stage.check_interrupt()  # a boundary


stage.run(main)
"""


def test_a_handler_that_runs_after_a_boundary_acted_on_its_request_raises_nothing_more():
    ran = subprocess.run([sys.executable, "-c", LATE_HANDLER], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 130 and "interrupted: no output was written" in ran.stderr, ran.stderr
