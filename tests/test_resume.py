"""A training stage killed mid-run resumes from its last checkpoint and ends exactly as an
uninterrupted run does."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from support import EVERY_INGREDIENT, TORCH, interrupt_at, setup_project
from resnet_cifar import paths, prepare, train

EPOCHS = 6

pytestmark = pytest.mark.slow


def train_command(variant: str) -> list[str]:
    return [sys.executable, "-m", "resnet_cifar.train", variant]


def outputs(project: Path, variant: str) -> dict[str, bytes]:
    """The DVCLive history and the model summary of a finished run."""
    variant_dir = project / paths.VARIANTS_DIR / variant
    return {str(p.relative_to(variant_dir)): p.read_bytes() for p in sorted(variant_dir.rglob("*"))
            if p.is_file() and p.name != "train_time.json"}


def weights(project: Path, variant: str) -> list[np.ndarray]:
    return keras.models.load_model(project / paths.model_path(variant)).get_weights()


@pytest.mark.parametrize("backend", ["tensorflow", "jax", TORCH])
def test_killed_training_resumes_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, backend):
    """The dense variant with every ingredient on (dropout, mixup, augmentation, schedule, weight
    averaging), so that their random and running states survive the restart, on each backend the
    tests install. (The conv variant's batch norm is resumed through `dvc repro` in
    test_pipeline.py, on two replicas in test_distribute.py.)"""
    variant = "deep"
    runs = {}
    for name in ("uninterrupted", "killed"):
        project = tmp_path / name
        project.mkdir()
        setup_project(project, monkeypatch, "cifar-10-binary", n_train=1500, epochs=EPOCHS, backend=backend)
        prepare.main([])
        runs[name] = project
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["variants"]["deep"] |= EVERY_INGREDIENT
        Path("params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(runs["uninterrupted"])
    subprocess.run(train_command(variant), capture_output=True, timeout=300, check=True)

    monkeypatch.chdir(runs["killed"])
    interrupt_at(train_command(variant), f"[{variant}] epoch 3/{EPOCHS}")  # killed saving epoch 3, or in epoch 4
    assert (paths.checkpoint_dir(variant) / "state.json").is_file()

    resumed = subprocess.run(train_command(variant), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    resumed_after = re.search(rf"\[{variant}\] resuming after epoch (\d) from .dvc/tmp/checkpoints/{variant}/",
                              resumed.stdout)
    assert resumed_after and 2 <= int(resumed_after[1]) <= 4, resumed.stdout[:300]
    assert f"[{variant}] epoch 1/{EPOCHS}" not in resumed.stdout
    assert not paths.checkpoint_dir(variant).exists()  # removed once the stage completes

    assert outputs(runs["killed"], variant) == outputs(runs["uninterrupted"], variant)
    for killed, reference in zip(weights(runs["killed"], variant), weights(runs["uninterrupted"], variant)):
        np.testing.assert_array_equal(killed, reference)


@pytest.mark.parametrize("change", ["params", "code"])
def test_a_checkpoint_of_other_params_or_code_is_not_resumed(tmp_path, monkeypatch, change):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", n_train=1500, epochs=EPOCHS)
    prepare.main([])
    # The stage runs a copy of the package, which the code case then edits.
    package = tmp_path / "code" / "resnet_cifar"
    shutil.copytree(Path(train.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    env = os.environ | {"PYTHONPATH": str(package.parent)}
    interrupt_at(train_command("small"), f"[small] epoch 2/{EPOCHS}", env=env)
    assert paths.checkpoint_dir("small").is_dir()

    if change == "params":
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["variants"]["small"]["learning_rate"] = 0.001
        Path("params.yaml").write_text(yaml.safe_dump(params))
        why = "params"
    else:  # a module the train stage imports
        augment = package / "augment.py"
        augment.write_text(augment.read_text() + "\n# changed\n")
        why = "resnet_cifar/augment.py"
    rerun = subprocess.run(train_command("small"), capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"checkpoints/small: made with a different {why}; starting over" in rerun.stdout
    assert f"[small] epoch 1/{EPOCHS}" in rerun.stdout and "resuming" not in rerun.stdout
