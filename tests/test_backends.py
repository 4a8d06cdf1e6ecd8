"""The stages on other Keras backends than TensorFlow: JAX and PyTorch (where it is installed)
train the same variants, with TensorFlow absent too, and their models predict alike on TensorFlow
and back; JAX trains one model on two devices, or in two processes, as on one.
(Repeatable, bit-identical resumes on each backend: test_resume.py.)"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from support import TINY_CONV, TORCH, setup_project
from resnet_cifar import datasets, paths, prepare  # models: registers the custom layers to load

pytestmark = pytest.mark.slow


def backend_project(project: Path, monkeypatch, backend: str = "jax", **train_overrides) -> None:
    """cwd = a prepared project on `backend` with the tiny conv variant (batch norm, patch
    whitening, every fast-training ingredient)."""
    project.mkdir(exist_ok=True)
    setup_project(project, monkeypatch, "cifar-10-binary", n_train=300, epochs=3, backend=backend, **train_overrides)
    prepare.main([])
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"] = {"conv": TINY_CONV | {"learning_rate": 0.005}}
    Path("params.yaml").write_text(yaml.safe_dump(params))


def run(command: list[str], env: dict | None = None) -> str:
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout


PREDICT = """
import sys
import keras
import numpy as np
from resnet_cifar import models  # registers the custom layers
model = keras.models.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
"""


def predicted(model: Path, images: Path, backend: str) -> np.ndarray:
    """`model`'s predictions of `images` (.npy) in a process on `backend`."""
    run([sys.executable, "-c", PREDICT, str(model), str(images), str(images.with_suffix(f".{backend}.npy"))],
        env=os.environ | {"KERAS_BACKEND": backend})
    return np.load(images.with_suffix(f".{backend}.npy"))


@pytest.mark.parametrize("backend", ["jax", TORCH])
def test_a_model_trained_on_one_backend_predicts_alike_on_tensorflow_and_the_other(tmp_path, monkeypatch, backend):
    backend_project(tmp_path / "project", monkeypatch, backend)
    images = tmp_path / "images.npy"
    np.save(images, datasets.load_prepared()["x_test"])
    for trained_on in (backend, "tensorflow"):
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["train"]["backend"] = trained_on
        Path("params.yaml").write_text(yaml.safe_dump(params))
        assert f"on {trained_on}" in run([sys.executable, "-m", "resnet_cifar.train", "conv"])
        record = yaml.safe_load(paths.timing_path("conv").read_text())["ran_on"]
        assert record["backend"] == trained_on and record[trained_on]
        np.testing.assert_allclose(predicted(paths.model_path("conv"), images, "tensorflow"),
                                   predicted(paths.model_path("conv"), images, backend), rtol=1e-5, atol=1e-6)


# A stage (argv: the module to hide, the stage, its arguments) in a process where that module can be
# neither imported nor found, as where it is not installed. (Not sys.modules[name] = None: Keras
# takes "tensorflow" in sys.modules for TensorFlow imported.)
WITHOUT = """
import importlib
import importlib.util
import sys
hidden = sys.argv.pop(1)


class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Hide())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name == hidden else find_spec(name, package)
from resnet_cifar import stage
stage.run(importlib.import_module("resnet_cifar." + sys.argv.pop(1)).main)
"""


@pytest.mark.parametrize("backend, message", [
    ("torch", "params.yaml: train.backend: torch is not installed here; install it (`pip install torch`"),
    ("theano", "params.yaml: train.backend: expected one of tensorflow, jax, torch, got 'theano'")])
def test_a_backend_that_is_unknown_or_not_installed_stops_the_stage_naming_the_key(tmp_path, monkeypatch, backend,
                                                                                    message):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", backend=backend)
    for stage in ("train", "evaluate"):
        ran = subprocess.run([sys.executable, "-c", WITHOUT, "torch", stage, "small"], capture_output=True,
                             text=True, timeout=300)
        assert ran.returncode == 1 and message in ran.stderr, ran.stderr


# The train stage on JAX with the CPU split into two host devices, trained on the first `n` of them.
ON_HOST_DEVICES = """
import os
import socket
import sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from resnet_cifar import runtime, stage, train
n = int(sys.argv.pop(1))
runtime.Devices.replicas = lambda self: ["cpu:0", "cpu:1"][:n]
stage.run(train.main)
"""


def weights(project: Path) -> list[np.ndarray]:
    return keras.models.load_model(project / paths.model_path("conv"), compile=False).get_weights()


def test_two_jax_devices_train_as_one_does_with_the_same_global_batch(tmp_path, monkeypatch):
    trained = {}
    for n in (1, 2):
        project = tmp_path / f"on{n}"
        backend_project(project, monkeypatch)
        printed = run([sys.executable, "-c", ON_HOST_DEVICES, str(n), "conv"],
                      env=os.environ | {"KERAS_BACKEND": "jax"})
        assert f"training in float32 on {', '.join(['cpu:0', 'cpu:1'][:n])}, Keras" in printed
        trained[n] = weights(project)
    for one, two in zip(trained[1], trained[2]):
        np.testing.assert_allclose(two, one, rtol=1e-3, atol=1e-4)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_jax_processes_train_one_model_as_one_process_does(tmp_path, monkeypatch):
    """Two processes on 127.0.0.1 as one data-parallel job (JAX's distributed runtime, the CPUs'
    collectives over TCP): process 0 writes what a single process writes, the same weights."""
    alone, job = tmp_path / "alone", tmp_path / "job"
    backend_project(alone, monkeypatch)
    run([sys.executable, "-m", "resnet_cifar.train", "conv"])
    backend_project(job, monkeypatch)
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-m", "resnet_cifar.train", "conv"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=os.environ | {"KERAS_DISTRIBUTION_JOB_ADDRESSES": address,
                                                    "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                                                    "KERAS_DISTRIBUTION_PROCESS_ID": str(index)})
                 for index in (0, 1)]
    printed = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(printed)
    assert "training in float32 on cpu:0, cpu:" in printed[0] and "2 processes, each on" in \
        yaml.safe_load((job / paths.timing_path("conv")).read_text())["ran_on"]["device"]
    assert "epoch 3/3" in printed[0] and "epoch" not in printed[1]  # process 0 reports and writes
    assert not (job / paths.CHECKPOINTS_DIR).exists() or not any((job / paths.CHECKPOINTS_DIR).iterdir())
    for one, two in zip(weights(alone), weights(job)):
        np.testing.assert_allclose(two, one, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend, environment, message", [
    ("tensorflow", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"},
     "KERAS_DISTRIBUTION_NUM_PROCESSES=2: a job of several processes trains on params.yaml's train.backend: jax, "
     "not tensorflow"),
    ("jax", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1"},
     "KERAS_DISTRIBUTION_NUM_PROCESSES=2, but KERAS_DISTRIBUTION_JOB_ADDRESSES not set"),
    ("jax", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"},
     "KERAS_DISTRIBUTION_NUM_PROCESSES=two: expected the number of processes of the training job")])
def test_a_job_of_several_processes_that_cannot_start_says_why(tmp_path, monkeypatch, backend, environment, message):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", backend=backend)
    ran = subprocess.run([sys.executable, "-m", "resnet_cifar.train", "small"], capture_output=True, text=True,
                         timeout=300, env=os.environ | environment)
    assert ran.returncode == 1 and message in ran.stderr, ran.stderr


@pytest.mark.parametrize("backend", ["jax", TORCH])
def test_the_stages_run_on_jax_or_torch_where_tensorflow_cannot_be_imported(tmp_path, monkeypatch, backend):
    backend_project(tmp_path / "project", monkeypatch, backend)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"]["small"] = {"widths": [16]}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    environment = os.environ | {"KERAS_BACKEND": backend}
    for stage, *args in (("train", "conv"), ("evaluate", "conv"), ("train", "small"), ("evaluate", "small"),
                         ("report",)):
        run([sys.executable, "-c", WITHOUT, "tensorflow", stage, *args], env=environment)
    assert yaml.safe_load(paths.timing_path("conv").read_text())["ran_on"]["backend"] == backend
    assert json.loads(paths.live_outputs("conv")[0].read_text())["step"] == 2  # DVCLive's names, as on TensorFlow
    assert "| conv | conv | [4, 8] |" in paths.REPORT_MD.read_text()
