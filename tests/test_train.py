"""The train stage (train.py) on small generated archives, in-process and as a process."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from support import EVERY_INGREDIENT, TINY_CONV, interrupt_at, setup_project
from resnet_cifar import datasets, evaluate, paths, prepare, runtime, train, tta
from resnet_cifar.stage import StageError


def test_train_and_evaluate_a_100_class_variant(tmp_path, monkeypatch):
    setup_project(tmp_path, monkeypatch, "cifar-100-binary", n_train=200)
    prepare.main([])
    train.main(["small"])
    assert paths.model_path("small").is_file()
    history = json.loads((paths.live_dir("small") / "metrics.json").read_text())
    assert history["step"] == 1 and history["parameters"] == 3072 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 100 + 100
    timing = json.loads(paths.timing_path("small").read_text())
    assert set(timing) == {"train_seconds", "seconds_per_epoch", "peak_memory_mb", "ran_on"}
    assert timing["peak_memory_mb"] > 100
    # What produced the numbers: this machine, in the precision params.yaml's `auto` resolves to here.
    assert timing["ran_on"] == {"backend": "tensorflow", "precision": runtime.resolve_precision("auto"),
                                "device": runtime.Devices(tuple(runtime.gpus())).name(), "keras": keras.__version__,
                                "tensorflow": tf.__version__, "xla": False}  # a dense network
    evaluate.main(["small"])
    metrics = json.loads(paths.evaluate_path("small").read_text())
    assert metrics["ran_on"] == timing["ran_on"]
    assert len(metrics["test"]["per_class_accuracy"]) == 100
    assert metrics["test"]["top5_accuracy"] >= metrics["test"]["accuracy"]
    assert metrics["overfit_gap"] == pytest.approx(metrics["train"]["accuracy"] - metrics["test"]["accuracy"], abs=1e-4)
    assert len(paths.confusion_path("small").read_text().splitlines()) == 1 + 10


def test_every_ingredient_trains_saves_and_evaluates(tmp_path, monkeypatch):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", n_train=200, **EVERY_INGREDIENT)
    prepare.main([])
    train.main(["deep"])
    evaluate.main(["deep"])
    metrics = json.loads(paths.evaluate_path("deep").read_text())
    model = keras.models.load_model(paths.model_path("deep"))  # with its optimizer
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert {"stage2_block2_norm", "final_norm"} <= {layer.name for layer in model.layers}
    data = datasets.load_prepared()
    probabilities = tta.predict(model, data["x_test"], tta=True)  # the image's and its mirror's, averaged
    # The reported loss is plain cross-entropy plus the L2 penalty, not the label-smoothed loss trained on.
    penalty = sum(float(loss) for loss in model.losses)
    assert penalty > 0
    expected = -np.mean(np.sum(data["y_test"] * np.log(np.clip(probabilities, 1e-7, 1)), axis=1)) + penalty
    assert metrics["test"]["loss"] == pytest.approx(expected, abs=1e-4)
    assert metrics["test"]["loss"] != pytest.approx(model.evaluate(data["x_test"], data["y_test"], verbose=0)[0],
                                                    abs=1e-3)
    # Validated on the test set, the train stage leaves test-time augmentation to evaluate.
    assert "accuracy_tta" not in json.loads((paths.live_dir("deep") / "metrics.json").read_text())["eval"]


def test_a_held_out_split_is_also_scored_with_test_time_augmentation(tmp_path, monkeypatch):
    # Barely trained (a tiny rate), the network's predictions still vary with the image, and so between its views.
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", n_train=500, validation=0.5, tta="shifts",
                  learning_rate=1e-6, activation="gelu")
    prepare.main([])
    train.main(["small"])
    history = json.loads((paths.live_dir("small") / "metrics.json").read_text())
    seed = yaml.safe_load(Path("params.yaml").read_text())["seed"]
    _, (x_val, y_val) = train.split_validation(datasets.load_prepared(), 0.5, seed)
    model = keras.models.load_model(paths.model_path("small"), compile=False)
    assert history["eval"]["accuracy_tta"] == round(tta.accuracy(tta.predict(model, x_val, "shifts"), y_val), 4)
    assert history["eval"]["accuracy_tta"] != round(history["eval"]["accuracy"], 4)  # not the single view's


@pytest.mark.skipif("avx512f" not in (runtime.read_cpuinfo() or "").split(),
                    reason="oneDNN fuses a block's Add and ReLU, which the false error lines were about, only "
                           "on CPUs with AVX-512")
def test_train_and_evaluate_print_no_false_errors(tmp_path, monkeypatch):
    """TensorFlow's graph optimizer logged 'E0000 ... tfg_optimizer_hook ... empty op name' for the
    residual blocks' Add and ReLU, fused by grappler's remapper: an error line that was no error."""
    setup_project(tmp_path, monkeypatch, "cifar-10-binary")
    prepare.main([])
    for stage in ("train", "evaluate"):
        ran = subprocess.run([sys.executable, "-m", f"resnet_cifar.{stage}", "deep"], capture_output=True,
                             text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr
        assert not re.findall(r"^E\d{4} .*", ran.stderr, re.M), f"{stage}: {ran.stderr}"


def test_diverging_training_stops_and_saves_nothing(tmp_path, monkeypatch):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", optimizer="sgd", learning_rate=1e12)
    prepare.main([])
    with pytest.raises(StageError, match=r"variant small: training diverged \(loss nan\) in epoch 1"):
        train.main(["small"])
    assert not paths.model_path("small").exists()
    assert not any(paths.live_dir("small").rglob("*"))  # DVCLive wrote nothing but its outputs
    assert not paths.timing_path("small").exists()


def test_corrupt_inputs_name_the_file_and_the_fix(tmp_path, monkeypatch):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary")
    prepare.main([])
    x_train = paths.PREPARED_DIR / "x_train.npy"
    x_train.write_bytes(x_train.read_bytes()[:1000])
    with pytest.raises(StageError, match=r"data/prepared/x_train.npy: missing or corrupt .*`dvc repro -f prepare`"):
        train.main(["small"])
    prepare.main([])
    train.main(["small"])
    model = paths.model_path("small")
    whole = model.read_bytes()
    for corrupt in (whole[: len(whole) // 2], np.random.default_rng(0).bytes(4096)):
        model.write_bytes(corrupt)
        with pytest.raises(StageError, match=r"models/small.keras: cannot load the model .*`dvc repro -f train@small`"):
            evaluate.main(["small"])


@pytest.mark.skipif(os.name == "nt", reason="sends the signal to a POSIX process group")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_training_leaves_no_output(tmp_path, monkeypatch, sig):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", epochs=10_000)
    prepare.main([])
    stage = interrupt_at([sys.executable, "-m", "resnet_cifar.train", "small"], "[small] epoch 3/10000", sig)
    output = stage.stdout
    assert stage.returncode == 130, output
    assert "interrupted: no output was written" in output
    assert not paths.model_path("small").exists()
    assert not any(paths.live_dir("small").rglob("*"))
    assert not Path("models").exists() or not any(Path("models").iterdir())


@pytest.mark.skipif(os.name == "nt", reason="sends the signal to a POSIX process group")
def test_the_whitening_bias_learns_for_its_epochs_then_stays(tmp_path, monkeypatch):
    """Killed after its first epoch, the whitening bias the checkpoint holds is the one the run
    ends with (without a weight average, which would mix in its earlier values)."""
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", n_train=300)
    prepare.main([])
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"] = {"conv": TINY_CONV | {"epochs": 3, "whiten_bias_epochs": 1, "ema": 0.0}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "resnet_cifar.train", "conv"]
    interrupt_at(command, "[conv] epoch 2/3")
    bias_after_its_epoch = keras.models.load_model(paths.checkpoint_dir("conv") / "model.keras").get_layer(
        "stem_whiten").bias.numpy()
    assert np.any(bias_after_its_epoch != 0)  # it learned in epoch 1
    subprocess.run(command, capture_output=True, timeout=300, check=True)
    final = keras.models.load_model(paths.model_path("conv"), compile=False)
    np.testing.assert_array_equal(final.get_layer("stem_whiten").bias.numpy(), bias_after_its_epoch)


def test_xla_changes_the_conv_network_only_by_float_rounding(tmp_path, monkeypatch):
    """A fixed-seed run of the tiny conv variant compiled with XLA and one without end within
    float32 rounding of each other, and each says which it was."""
    setup_project(tmp_path, monkeypatch, "cifar-10-binary", n_train=300)
    prepare.main([])
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"] = {f"xla_{xla}": TINY_CONV | {"epochs": 2, "xla": xla} for xla in (True, False)}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for variant in params["variants"]:  # each in a process of its own, as the stage runs: TensorFlow's
        # op determinism, once on in a process (the run without XLA), stays on and rules XLA out
        subprocess.run([sys.executable, "-m", "resnet_cifar.train", variant], capture_output=True, timeout=300, check=True)
    compiled, plain = (keras.models.load_model(paths.model_path(variant), compile=False).get_weights()
                       for variant in params["variants"])
    assert not all(np.array_equal(a, b) for a, b in zip(compiled, plain))  # two ways of computing
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    for variant, xla in (("xla_True", True), ("xla_False", False)):
        assert json.loads(paths.timing_path(variant).read_text())["ran_on"]["xla"] is xla
