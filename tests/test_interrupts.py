"""Stop requests (stage.py): Ctrl-C, SIGTERM, a second request and the end of the process that
started a stage each end it within seconds, with exit code 130, no output and a checkpoint the next
run resumes from, bit-identically."""

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from support import children, running, setup_project
from resnet_cifar import paths, prepare

STOP_LIMIT_SECONDS = 10
STRESS_SEED = 20261207
SHORT_IMAGES, SHORT_INTERRUPTS, LONG_INTERRUPTS = 2400, 17, 3
# The stress test's variant: a short epoch (a checkpoint every second or so), and one of a long
# epoch, whose calls into the backend still come about a second apart. The short run's epochs
# outlast the latest interrupt even when the reference run, which times the first epoch, started
# slower than the interrupted runs (a busy CPU): with 12 epochs a run once ended before it.
SHORT = {"widths": [128], "epochs": 40, "batch_size": 32, "dropout": 0.1, "mixup": 0.4, "crop": 2,
         "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1, "schedule": "cosine"}
LONG = {"widths": [1536], "epochs": 2, "batch_size": 64, "precision": "float32"}
LONG_IMAGES = 12_800

pytestmark = pytest.mark.slow


def train_command(variant: str) -> list[str]:
    return [sys.executable, "-m", "resnet_cifar.train", variant]


def start(command: list[str], **kwargs) -> subprocess.Popen:
    # Ctrl-C must reach the command even when the tests run as a background job, which ignores it.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def lines_until(process: subprocess.Popen, pattern: str) -> list[str]:
    """What the process prints up to the first line that starts with a match of `pattern`."""
    printed = []
    for line in process.stdout:
        printed.append(line)
        if re.match(pattern, line):
            return printed
    raise AssertionError(f"ended without printing {pattern!r}:\n{''.join(printed)}")


def epoch_ended(variant: str, epoch: int) -> str:
    """The line train prints at the end of an epoch (not the progress lines within it), with the
    epoch's seconds as group 1."""
    return rf"\[{variant}\] epoch {epoch}/\d+  .* ([\d.]+)s  ~"


def stop(process: subprocess.Popen, sig: int) -> tuple[float, str]:
    """Send `sig`; the seconds until the process ended, and what it printed meanwhile."""
    sent = time.perf_counter()
    process.send_signal(sig)
    output = process.communicate(timeout=60)[0]
    return time.perf_counter() - sent, output


def no_outputs(variant: str) -> bool:
    written = [paths.model_path(variant), paths.timing_path(variant), paths.summary_path(variant),
               *paths.live_outputs(variant)]
    return not any(path.exists() for path in written)


def checkpointed_epochs(variant: str) -> int:
    state = paths.checkpoint_dir(variant) / "state.json"
    return len(yaml.safe_load(state.read_text())["history"]) if state.is_file() else 0


def project(root: Path, monkeypatch, variants: dict, n_train: int) -> None:
    root.mkdir()
    setup_project(root, monkeypatch, "cifar-10-binary", n_train=n_train)
    prepare.main([])
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"] = variants
    Path("params.yaml").write_text(yaml.safe_dump(params))


def interrupts_in_a_long_epoch(root: Path, monkeypatch, rng: random.Random) -> list[float]:
    """LONG_INTERRUPTS interrupts, each a random moment into the second epoch of a run whose
    epochs last longer than the limit; the seconds each took to stop."""
    project(root, monkeypatch, {"long": LONG}, n_train=LONG_IMAGES)
    process = start(train_command("long"))
    epoch_seconds = float(re.match(epoch_ended("long", 1), lines_until(process, epoch_ended("long", 1))[-1])[1])
    stop(process, signal.SIGTERM)
    assert checkpointed_epochs("long") == 1 and epoch_seconds > STOP_LIMIT_SECONDS
    stopped_in = []
    for attempt in range(LONG_INTERRUPTS):
        sig, delay = rng.choice([signal.SIGINT, signal.SIGTERM]), rng.uniform(0.5, 8.0)
        print(f"interrupt {SHORT_INTERRUPTS + attempt + 1}, in a {epoch_seconds:.0f} s epoch: "
              f"{signal.Signals(sig).name} {delay:.2f} s into it")
        process = start(train_command("long"))
        lines_until(process, r"\[long\] resuming after epoch 1")
        time.sleep(delay)
        seconds, output = stop(process, sig)
        stopped_in.append(seconds)
        assert process.returncode == 130 and "[long] epoch 2/2" not in output, output
        assert seconds < STOP_LIMIT_SECONDS and no_outputs("long")
        assert checkpointed_epochs("long") == 1
    return stopped_in


def test_twenty_interrupts_at_random_moments_stop_in_seconds_and_resume_bit_identically(tmp_path, monkeypatch):
    """17 interrupts of a run of short epochs, each at a random moment from the start of the process
    to a little after its first epoch (imports, building, training, validation, checkpointing), every
    rerun resuming from the last checkpoint, and the chain ending as an uninterrupted run; then 3
    interrupts in the middle of an epoch that lasts longer than the limit."""
    rng = random.Random(STRESS_SEED)
    print(f"stress test seed {STRESS_SEED}")
    project(tmp_path / "reference", monkeypatch, {"short": SHORT}, n_train=SHORT_IMAGES)
    started = time.perf_counter()
    reference_run = start(train_command("short"))
    lines_until(reference_run, epoch_ended("short", 1))
    first_epoch_done = time.perf_counter() - started  # the start-up, tracing and one epoch
    assert reference_run.wait(timeout=300) == 0
    reference = keras.models.load_model(paths.model_path("short"), compile=False).get_weights()
    reference_history = paths.live_outputs("short")[0].read_bytes()

    project(tmp_path / "interrupted", monkeypatch, {"short": SHORT}, n_train=SHORT_IMAGES)
    stopped_in = []
    for attempt in range(SHORT_INTERRUPTS):
        sig, delay = rng.choice([signal.SIGINT, signal.SIGTERM]), rng.uniform(0.3, first_epoch_done + 1.5)
        print(f"interrupt {attempt + 1}: {signal.Signals(sig).name} {delay:.2f} s after the start")
        before = checkpointed_epochs("short")
        process = start(train_command("short"))
        time.sleep(delay)
        seconds, output = stop(process, sig)
        stopped_in.append(seconds)
        assert process.returncode == 130 and "interrupted: no output was written" in output, output
        assert seconds < STOP_LIMIT_SECONDS, output
        assert no_outputs("short")
        resumed = re.search(r"\[short\] resuming after epoch (\d+)", output)
        assert (int(resumed[1]) if resumed else before) == before, output
        assert checkpointed_epochs("short") >= before
    assert 0 < checkpointed_epochs("short") < SHORT["epochs"]
    finished = subprocess.run(train_command("short"), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert paths.live_outputs("short")[0].read_bytes() == reference_history
    for resumed, uninterrupted in zip(keras.models.load_model(paths.model_path("short"), compile=False).get_weights(),
                                      reference):
        np.testing.assert_array_equal(resumed, uninterrupted)

    stopped_in += interrupts_in_a_long_epoch(tmp_path / "long", monkeypatch, rng)
    print(f"{len(stopped_in)} interrupts, each stopped within {max(stopped_in):.1f} s")


def test_a_second_request_ends_the_stage_at_once(tmp_path, monkeypatch):
    project(tmp_path / "project", monkeypatch, {"long": LONG}, n_train=LONG_IMAGES)
    process = start(train_command("long"))
    lines_until(process, r"\[long\] training in")
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    seconds, output = stop(process, signal.SIGINT)
    assert process.returncode == 130 and "interrupted again: stopped at once" in output, output
    assert seconds < 2 and no_outputs("long")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_a_stage_stops_when_the_process_that_started_it_ends(tmp_path, monkeypatch):
    """The parent is killed (SIGKILL: it passes nothing on); the stage notices within seconds."""
    project(tmp_path / "project", monkeypatch, {"long": LONG}, n_train=LONG_IMAGES)
    starter = start([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                     *train_command("long")])
    lines_until(starter, r"\[long\] training in")
    [stage] = children(starter.pid)
    starter.kill()
    starter.communicate(timeout=10)
    deadline = time.monotonic() + STOP_LIMIT_SECONDS
    while running(stage) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(stage) and no_outputs("long")
