"""Helpers the tests share: tiny params, projects on generated archives, and processes to
interrupt and watch."""

import copy
import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from cifar_archives import make_archive
from resnet_cifar import download
from resnet_cifar.models import Network, build_model
from resnet_cifar.params import variant_spec

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

# The torch backend, in tests parametrized by backend: PyTorch is not in requirements.lock (PyPI's
# build for Linux is the CUDA one, gigabytes); .ci/run installs the CPU build where it is at hand.
TORCH = pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                    reason="PyTorch is not installed here (README: Backends and GPUs)"))


def load_tasks():
    """tasks.py, the README's commands, as a module: it sits beside the package, not in it."""
    spec = importlib.util.spec_from_file_location("tasks", PROJECT_PARAMS.parent / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_PARAMS = {
    "seed": 0,
    "data": {"dataset": "cifar10", "label_mode": "fine"},
    # The project's defaults (the assignment's recipe), shorter and faster.
    "train": {**yaml.safe_load(PROJECT_PARAMS.read_text())["train"],
              "epochs": 2, "batch_size": 16, "learning_rate": 0.003},
    "variants": {"small": {"widths": [16]},
                 "deep": {"widths": [16, 8], "dropout": 0.1, "l2": [0.001, 0.01]}},
}


def project_params() -> dict:
    """The project's own params.yaml."""
    return yaml.safe_load(PROJECT_PARAMS.read_text())


def tiny_params(dataset: str = "cifar10", label_mode: str = "fine") -> dict:
    """Params for fast runs on generated archives: two small variants, two epochs."""
    params = copy.deepcopy(TINY_PARAMS)
    params["data"] = {"dataset": dataset, "label_mode": label_mode}
    return params


def setup_project(tmp_path: Path, monkeypatch, fmt: str, label_mode: str = "fine", n_train: int = 50,
                  **train_overrides):
    """cwd = a project with tiny params whose download stage has run on a generated archive."""
    dataset = "cifar100" if fmt.startswith("cifar-100") else "cifar10"
    (tmp_path / "mirror").mkdir()
    archive = make_archive(tmp_path / "mirror", fmt, n_train=n_train)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR_SOURCE", str(archive.path))
    monkeypatch.setenv("CIFAR_MEMBER_MD5S", str(archive.md5s_path))
    params = tiny_params(dataset, label_mode)
    params["train"].update(train_overrides)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    download.main([])
    return archive


# Every ingredient beyond the assignment, on: what a `tuned` variant can use.
EVERY_INGREDIENT = {"blocks": 2, "expansion": 2, "activation": "gelu", "norm": "layer", "prenorm": True,
                    "standardize": True, "flip": True, "translate": 2, "crop": 1, "mixup": 0.4,
                    "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1, "schedule": "cosine",
                    "label_smoothing": 0.1, "ema": 0.9, "tta": True}

# A tiny convolutional variant with every ingredient fast CIFAR training uses.
TINY_CONV = {"widths": [4, 8], "arch": "conv", "stem": "whiten", "blocks": [1, 1], "downsample": "pool_first",
             "conv_init": "dirac", "norm": "batch", "norm_momentum": 0.6, "norm_scale": False, "logit_scale": 0.2,
             "standardize": True, "flip": "alternate", "crop": 2, "optimizer": "nesterov", "learning_rate": 0.05,
             "norm_lr_factor": 4, "weight_decay": 0.005, "warmup_epochs": 1, "schedule": "linear",
             "label_smoothing": 0.2, "ema": 0.9, "tta": "shifts",
             "precision": "float32"}  # bfloat16 convolutions are emulated, ~10x slower, without AVX-512 BF16


def interrupt_at(command: list[str], line_start: str, sig: int | None = None,
                 cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `command`, send `sig` (SIGKILL unless given) to it and its children once it prints a
    line starting with `line_start`; return its exit code and everything it printed (as `stdout`).
    POSIX only (the tests that kill are marked slow, which Windows does not run): SIGKILL is not
    named on Windows, hence no default in the signature, where it would fail every import there."""
    # Ctrl-C must reach the command even when the tests run as a background job, which ignores it.
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith(line_start):
            break
    else:
        raise AssertionError(f"{' '.join(command)} ended without printing {line_start!r}:\n{''.join(printed)}")
    os.killpg(process.pid, sig or signal.SIGKILL)
    printed.append(process.communicate(timeout=60)[0])
    return subprocess.CompletedProcess(command, process.returncode, "".join(printed))


def process_status(pid: int) -> tuple[str, int, int] | None:
    """(state, parent, session) of a process, from Linux's /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[3])


def running(pid: int) -> bool:
    status = process_status(pid)
    return status is not None and status[0] not in "ZX"  # an ended child its new parent has not reaped


def processes_where(field: int, value: int) -> list[int]:
    """The running processes whose status field `field` (1: parent, 2: session) is `value`."""
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and running(int(entry.name))
            and (process_status(int(entry.name)) or ("", 0, 0))[field] == value]


def children(pid: int) -> list[int]:
    return processes_where(1, pid)


def command_line(pid: int) -> str:
    """A process's arguments, NUL-separated (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """The running processes that `pid` started, and those they started, and so on."""
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def session_processes(session: int) -> list[int]:
    return processes_where(2, session)


def default_network(widths: list[int], **keys) -> Network:
    """The network of params.yaml's `train` defaults (the assignment's) with these widths, and
    `keys` changed as a variant of params.yaml changes them."""
    params = tiny_params()
    params["variants"] = {"v": {"widths": widths, **keys}}
    return Network.of(variant_spec(params, "v"))


def built(widths: list[int], num_classes: int, input_shape: tuple = (32, 32, 3),
          training_images: np.ndarray | None = None, **keys) -> keras.Model:
    """models.build_model of `default_network(widths, **keys)`, for training images of
    `input_shape` (one blank image where none are given)."""
    images = np.zeros((1, *input_shape), np.float32) if training_images is None else training_images
    return build_model(default_network(widths, **keys), num_classes, images, "model")
