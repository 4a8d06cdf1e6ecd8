"""Training on several devices (MirroredStrategy): the CPU split into two logical devices stands in
for two GPUs."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from support import TINY_CONV, interrupt_at, setup_project
from resnet_cifar import paths, prepare

EPOCHS = 3

pytestmark = pytest.mark.slow

# The train stage's command, on a CPU split into two logical devices, trained on the first `n` of them
# (the stage trains on the GPUs it sees; here the logical CPUs play them).
ON_LOGICAL_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from resnet_cifar import runtime, stage, train
n = int(sys.argv.pop(1))
runtime.Devices.replicas = lambda self: [device.name for device in tf.config.list_logical_devices("CPU")][:n]
stage.run(train.main)
"""


def train_on(n: int, variant: str) -> list[str]:
    return [sys.executable, "-c", ON_LOGICAL_CPUS, str(n), variant]


def projects(tmp_path: Path, monkeypatch, names: list[str]) -> dict[str, Path]:
    """Projects with the same prepared data and the tiny conv variant (batch norm)."""
    made = {}
    for name in names:
        project = tmp_path / name
        project.mkdir()
        setup_project(project, monkeypatch, "cifar-10-binary", n_train=600, epochs=EPOCHS)
        prepare.main([])
        params = yaml.safe_load(Path("params.yaml").read_text())
        # (conv's learning rate lowered from 0.05, at which float rounding differences grow to 1e-3 in 3 epochs)
        # (and without XLA, which `auto` uses on one CPU device but not on replicas: one way of computing)
        params["variants"] = {"conv": TINY_CONV | {"learning_rate": 0.005, "xla": False}}
        Path("params.yaml").write_text(yaml.safe_dump(params))
        made[name] = project
    return made


def run_in(project: Path, command: list[str]) -> str:
    result = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def weights(project: Path, variant: str) -> list[np.ndarray]:
    """Every weight of the trained model, batch norm's moving statistics included."""
    return keras.models.load_model(project / paths.model_path(variant), compile=False).get_weights()


def history(project: Path, variant: str) -> dict[str, np.ndarray]:
    plots = project / paths.live_dir(variant) / "plots" / "metrics"
    return {str(tsv.relative_to(plots)): np.loadtxt(tsv, skiprows=1, usecols=-1, ndmin=1)
            for tsv in sorted(plots.rglob("*.tsv"))}


@pytest.fixture(scope="module")
def on_two_replicas(tmp_path_factory) -> Path:
    """A project whose tiny conv variant was trained on two replicas, uninterrupted."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        project = projects(tmp_path_factory.mktemp("replicas"), monkeypatch, ["two"])["two"]
    assert "training in float32 on /device:CPU:0, /device:CPU:1, Keras " in run_in(project, train_on(2, "conv"))
    return project


def test_two_replicas_train_as_one_device_does_with_the_same_global_batch(on_two_replicas, tmp_path, monkeypatch):
    """The same losses and weights, up to float rounding (the replicas sum in another order), for the
    tiny conv variant with every ingredient of fast training. Its batch norm is synchronized:
    measured, its first epoch's train loss differs by 9e-8 relative (6.5e-5 unsynchronized, each
    replica normalizing by its half batch's statistics), its third by 2e-5; its weights by up to 1.5e-3."""
    runs = projects(tmp_path, monkeypatch, ["one"]) | {"two": on_two_replicas}
    assert "training in float32 on /device:CPU:0, Keras " in run_in(runs["one"], train_on(1, "conv"))
    one, two = history(runs["one"], "conv"), history(runs["two"], "conv")
    assert one.keys() == two.keys() and len(one["train/loss.tsv"]) == EPOCHS
    np.testing.assert_allclose(two["train/loss.tsv"][0], one["train/loss.tsv"][0], rtol=1e-6)
    np.testing.assert_allclose(two["train/loss.tsv"], one["train/loss.tsv"], rtol=1e-4)
    # (evaluated on 10 test images with batch norm's moving statistics: 5e-4 measured)
    np.testing.assert_allclose(two["eval/loss.tsv"], one["eval/loss.tsv"], rtol=2e-3)
    for a, b in zip(weights(runs["two"], "conv"), weights(runs["one"], "conv"), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-3)


def test_training_on_two_replicas_resumes_after_a_kill(on_two_replicas, tmp_path, monkeypatch):
    runs = projects(tmp_path, monkeypatch, ["killed"]) | {"uninterrupted": on_two_replicas}
    monkeypatch.chdir(runs["killed"])
    interrupt_at(train_on(2, "conv"), f"[conv] epoch 2/{EPOCHS}")
    resumed = run_in(runs["killed"], train_on(2, "conv"))
    assert "[conv] resuming after epoch" in resumed and f"[conv] epoch 1/{EPOCHS}" not in resumed
    for name, values in history(runs["uninterrupted"], "conv").items():
        np.testing.assert_array_equal(history(runs["killed"], "conv")[name], values, err_msg=name)
    for a, b in zip(weights(runs["killed"], "conv"), weights(runs["uninterrupted"], "conv"), strict=True):
        np.testing.assert_array_equal(a, b)
