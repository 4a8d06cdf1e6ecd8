"""prepare, explore, train and evaluate on small generated archives, in-process."""

import dataclasses
import json
import math
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

from cifar_archives import FORMATS
from support import EVERY_INGREDIENT, TINY_CONV, built, interrupt_at, setup_project, tiny_params
from resnet_cifar import batches, checkpoint, datasets, evaluate, explore, optimizers, paths, prepare, runtime, train
from resnet_cifar.params import load_params, variant_spec
from resnet_cifar.stage import StageError, all_or_nothing, atomic_path


@pytest.mark.parametrize("fmt, label_mode", [(fmt, "fine") for fmt in FORMATS] + [("cifar-100-binary", "coarse")])
def test_prepare_scales_pixels_and_one_hot_encodes(tmp_path, monkeypatch, capsys, fmt, label_mode):
    archive = setup_project(tmp_path, monkeypatch, fmt, label_mode)
    prepare.main([])
    prepared = datasets.load_prepared()
    coarse = label_mode == "coarse"
    for split in ("train", "test"):
        x, y = prepared[f"x_{split}"], prepared[f"y_{split}"]
        assert x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(x, getattr(archive, f"x_{split}").astype("float32") / 255)
        labels = getattr(archive, f"y_{split}_coarse" if coarse else f"y_{split}")
        assert y.shape == (len(labels), 20 if coarse else 100 if "100" in fmt else 10)
        np.testing.assert_array_equal(y.sum(axis=1), 1)
        np.testing.assert_array_equal(y.argmax(axis=1), labels)
    assert prepared["classes"] == (archive.coarse_classes if coarse else archive.classes)
    printed = capsys.readouterr().out
    assert "x_train: (50, 32, 32, 3) float32, min 0.0, max 1.0" in printed
    assert f"y_test: (10, {y.shape[1]}) one-hot" in printed


@pytest.mark.parametrize("fmt", ["cifar-10-binary", "cifar-100-python"])
def test_explore_writes_figures_and_numbers(tmp_path, monkeypatch, fmt):
    archive = setup_project(tmp_path, monkeypatch, fmt)
    explore.main([])
    summary = json.loads(Path("metrics/explore.json").read_text())
    assert summary["images"] == {"train": 50, "test": 10}
    assert summary["classes"] == len(archive.classes)
    train_counts = np.bincount(archive.y_train, minlength=len(archive.classes))
    assert summary["class_count_min"]["train"] == train_counts.min()
    assert summary["class_count_max"]["train"] == train_counts.max()
    assert summary["pixel_min"] == archive.x_train.min() and summary["pixel_max"] == archive.x_train.max()
    red = archive.x_train[..., 0] / 255
    assert summary["channel_mean"]["red"] == pytest.approx(red.mean(), abs=1e-4)
    assert summary["channel_std"]["red"] == pytest.approx(red.std(), abs=1e-4)
    for name in ("first_16_images", "examples_per_class", "class_counts", "pixel_histograms"):
        assert Path(f"metrics/explore/{name}.png").stat().st_size > 5000


def test_validation_fraction_holds_out_part_of_train():
    x = np.arange(100)[:, None]
    prepared = {"x_train": x, "y_train": x, "x_test": x[:5], "y_test": x[:5]}
    (x_fit, _), (x_val, _) = batches.split_validation(prepared, 0.2, seed=0)
    assert len(x_fit) == 80 and len(x_val) == 20
    assert sorted(np.concatenate([x_fit, x_val]).ravel().tolist()) == list(range(100))
    (_, _), (x_val_test, _) = batches.split_validation(prepared, "test", seed=0)
    assert len(x_val_test) == 5


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
                                "tensorflow": tf.__version__}
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
    probabilities = evaluate.predict(model, data["x_test"], tta=True)  # the image's and its mirror's, averaged
    # The reported loss is plain cross-entropy plus the L2 penalty, not the label-smoothed loss trained on.
    penalty = sum(float(loss) for loss in model.losses)
    assert penalty > 0
    expected = -np.mean(np.sum(data["y_test"] * np.log(np.clip(probabilities, 1e-7, 1)), axis=1)) + penalty
    assert metrics["test"]["loss"] == pytest.approx(expected, abs=1e-4)
    assert metrics["test"]["loss"] != pytest.approx(model.evaluate(data["x_test"], data["y_test"], verbose=0)[0],
                                                    abs=1e-3)


def sgd_steps(model: keras.Model, factor: float, gradient: float, **sgd_kwargs) -> dict[str, np.ndarray]:
    """Each weight's change in one step of optimizers.SGD (the weights are put back after it)."""
    start = [w.numpy() for w in model.trainable_weights]
    optimizer = optimizers.SGD(factor, optimizers.norm_weight_paths(model), learning_rate=0.1, **sgd_kwargs)
    optimizer.apply_gradients((np.full(w.shape, gradient, np.float32), w) for w in model.trainable_weights)
    steps = {w.path: w.numpy() - before for w, before in zip(model.trainable_weights, start)}
    for w, before in zip(model.trainable_weights, start):
        w.assign(before)
    return steps


def test_norm_lr_factor_scales_the_steps_of_the_norm_weights_alone():
    model = built([4], 3, input_shape=(4, 4, 3), arch="conv", blocks=1, stem=4, downsample="pool", norm="batch")
    norm_paths = optimizers.norm_weight_paths(model)
    assert set(norm_paths) == {w.path for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
                               for w in layer.trainable_weights} and len(norm_paths) == 8
    plain = sgd_steps(model, 1.0, 0.5, momentum=0.9, nesterov=True)
    boosted = sgd_steps(model, 4.0, 0.5, momentum=0.9, nesterov=True)
    for path, step in plain.items():
        np.testing.assert_allclose(boosted[path], 4 * step if path in norm_paths else step, rtol=1e-6)
    # Weight decay stays the same for every weight.
    plain, boosted = sgd_steps(model, 1.0, 0.0, weight_decay=0.1), sgd_steps(model, 4.0, 0.0, weight_decay=0.1)
    assert any(np.any(plain[path]) for path in norm_paths)  # the scales (gamma) decay
    for path, step in plain.items():
        np.testing.assert_array_equal(boosted[path], step)


def test_learning_rate_warms_up_then_decays():
    spec = variant_spec({**tiny_params(), "variants": {"v": {"widths": [4], "epochs": 10, "learning_rate": 0.01,
                                                             "warmup_epochs": 2, "schedule": "cosine"}}}, "v")
    schedule = optimizers.learning_rate(spec, steps_per_epoch=5)
    rates = [float(schedule(step)) for step in range(0, 51)]
    assert rates[0] == 0 and rates[5] == pytest.approx(0.005) and rates[10] == pytest.approx(0.01)
    assert rates[30] == pytest.approx(0.005, rel=1e-3)  # half-way through the cosine
    assert rates[50] == pytest.approx(0, abs=1e-9) and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    constant = optimizers.learning_rate(dataclasses.replace(spec, schedule="constant"), steps_per_epoch=5)
    assert float(constant(5)) == pytest.approx(0.005) and float(constant(50)) == pytest.approx(0.01)
    assert optimizers.learning_rate(dataclasses.replace(spec, schedule="constant", warmup_epochs=0), 5) == 0.01
    linear = optimizers.learning_rate(dataclasses.replace(spec, schedule="linear"), steps_per_epoch=5)
    assert float(linear(5)) == pytest.approx(0.005) and float(linear(20)) == pytest.approx(0.0075)
    assert float(schedule(20)) == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)) / 2)  # cosine, a quarter in
    assert float(linear(50)) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 sse", "bfloat16"),
                                             ("fpu amx_bf16 amx_tile", "bfloat16"),
                                             ("fpu avx512f avx2", "float32")])
def test_auto_precision_follows_the_cpu(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert runtime.resolve_precision("auto", cpuinfo) == expected
    assert runtime.resolve_precision("auto", tmp_path / "missing") == "float32"
    assert runtime.resolve_precision("float32", cpuinfo) == "float32"
    assert runtime.resolve_precision("bfloat16", tmp_path / "missing") == "bfloat16"


@pytest.mark.parametrize("capabilities, expected", [([(9, 0)], "bfloat16"), ([(8, 0), (8, 6)], "bfloat16"),
                                                    ([(8, 0), (7, 5)], "float16"), ([(7, 0)], "float16"),
                                                    ([(6, 1)], "float32")])
def test_auto_precision_follows_the_oldest_gpu_in_use(tmp_path, capabilities, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512_bf16\n")  # the GPUs decide, not the CPU
    assert runtime.resolve_precision("auto", cpuinfo, gpu_capabilities=capabilities) == expected
    assert runtime.resolve_precision("float32", cpuinfo, gpu_capabilities=capabilities) == "float32"


@pytest.mark.parametrize("flags, named", [("fpu avx512f avx512_bf16", "AVX-512 BF16"), ("fpu avx2", "no AVX-512 BF16")])
def test_the_cpu_is_named_with_its_bfloat16_support(tmp_path, flags, named):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {flags}\n")
    assert runtime.cpu_name(cpuinfo) == f"AMD EPYC 9R14 ({named})"


def test_the_stages_turn_grapplers_remapper_off():
    runtime.quiet_graph_optimizer()
    assert tf.config.optimizer.get_experimental_options()["remapping"] is False


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


# Named layers: Keras numbers unnamed ones by how many it has made in the process.
SEEDED_MODEL = ("keras.utils.set_random_seed(0); model = keras.Sequential("
                "[keras.Input((4,), name='image'), keras.layers.Dense(3, name='logits')], name='tiny')")


def test_a_saved_model_is_the_same_bytes_for_the_same_weights(tmp_path):
    """The same model built and saved by another process, later: other Python object ids, another
    date and time."""
    first, again = tmp_path / "first.keras", tmp_path / "again.keras"
    namespace = {"keras": keras}
    exec(SEEDED_MODEL, namespace)
    checkpoint.save_model(namespace["model"], first)
    subprocess.run([sys.executable, "-c", f"import sys, keras; from pathlib import Path; {SEEDED_MODEL}; "
                    "from resnet_cifar.checkpoint import save_model; save_model(model, Path(sys.argv[1]))",
                    str(again)], check=True, capture_output=True)
    assert first.read_bytes() == again.read_bytes()
    for saved, original in zip(keras.models.load_model(again).get_weights(), namespace["model"].get_weights()):
        np.testing.assert_array_equal(saved, original)


def test_pinned_devices_must_exist():
    # Naming a GPU this machine lacks is an error that says how many there are (on any machine).
    visible = len(tf.config.list_physical_devices("GPU"))
    with pytest.raises(StageError, match=rf"^params.yaml: train.devices: no GPU {visible} on this machine "
                                         rf"\({visible} visible\)$"):
        runtime.use_devices((visible,))


def test_devices_cpu_hides_every_gpu():
    # In a process of its own: hiding devices would change the rest of the suite's.
    shown = subprocess.run([sys.executable, "-c", "from resnet_cifar import runtime; "
                            "devices = runtime.use_devices('cpu'); print(devices.gpus, devices.replicas())"],
                           capture_output=True, text=True, check=True)
    assert shown.stdout.splitlines()[-1] == "() []"


def test_top_k_and_per_class_accuracy():
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    true_ids = np.array([1, 2, 2])
    assert evaluate.top_k_accuracy(true_ids, probabilities, 1) == pytest.approx(1 / 3)
    assert evaluate.top_k_accuracy(true_ids, probabilities, 2) == pytest.approx(2 / 3)
    per_class = evaluate.per_class_accuracy(true_ids, probabilities.argmax(axis=1), ["a", "b", "c"])
    assert per_class == {"a": None, "b": 0.0, "c": 0.5}


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


def test_each_stage_validates_params_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    params["variants"]["small"]["widths"] = [16, -1]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for stage in (train, evaluate):
        with pytest.raises(StageError, match=r"variants.small.widths\[1\]: expected a positive integer"):
            stage.main(["small"])
    assert variant_spec(load_params(), "deep").widths == (16, 8)


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


def test_ctrl_c_during_evaluation_leaves_no_output(tmp_path, monkeypatch):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary")
    prepare.main([])
    train.main(["small"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "write_confusion", interrupted)  # after evaluate.json is written
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["small"])
    assert not paths.evaluate_path("small").exists()
    assert not paths.confusion_path("small").exists()


def test_report_compares_each_variant_with_its_closest_predecessor():
    from resnet_cifar.report import changed_fields, verdict
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    baseline, deeper, dropout, l2 = (variant_spec(params, name) for name in ("baseline", "deeper", "dropout", "l2"))
    assert changed_fields(baseline, deeper) == ["widths", "learning_rate"]
    assert changed_fields(deeper, dropout) == ["dropout"]
    assert changed_fields(deeper, l2) == ["l2"]
    assert verdict(0.02, -0.1) == "raised test accuracy and reduced overfitting"
    assert verdict(-0.001, 0.05) == "made no real difference to test accuracy and increased overfitting"


def test_ablation_takes_each_ingredient_back_to_the_train_defaults():
    from resnet_cifar.ablation import ingredients_on
    from resnet_cifar.params import train_defaults
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["variants"]["conv"] = TINY_CONV
    defaults = train_defaults(params)
    conv = ingredients_on(variant_spec(params, "conv"), defaults)
    assert {"standardization", "flips", "alternating flips", "crops", "normalization", "weight decay",
            "warm-up and decay", "label smoothing", "patch whitening", "pool-first transitions", "Dirac initialization",
            "batch norm momentum", "frozen norm scales", "norm learning-rate factor", "logit scale"} <= set(conv)
    assert "translations" not in conv and "mixup" not in conv  # off in the conv variant
    # Some are taken away by another value than the default: random flips, a trained stem, Page's order.
    assert (conv["alternating flips"], conv["flips"]) == ({"flip": True}, {"flip": False})
    assert (conv["patch whitening"], conv["pool-first transitions"]) == ({"stem": 24}, {"downsample": "pool"})
    page = ingredients_on(variant_spec(params | {"variants": {"p": TINY_CONV | {"downsample": "pool", "flip": True,
                                                                                 "stem": 24}}}, "p"), defaults)
    assert not {"alternating flips", "patch whitening", "pool-first transitions"} & set(page)
    assert not any("test-time" in name for name in conv)  # TTA acts on the test set alone
    assert conv["crops"] == {"crop": defaults["crop"]} and conv["warm-up and decay"] == {
        "warmup_epochs": defaults["warmup_epochs"], "schedule": defaults["schedule"]}
    # The assignment's variants use none (the baseline's widths count does not make its blocks "extra").
    assert ingredients_on(variant_spec(params, "baseline"), defaults) == {}


def test_ablation_can_take_away_only_the_named_ingredients():
    from resnet_cifar.ablation import chosen
    uses = {"crops": {"crop": 0}, "flips": {"flip": False}, "GELU": {"activation": "relu"}}
    assert chosen(uses, None) == uses
    assert chosen(uses, ["GELU", "crops"]) == {"GELU": {"activation": "relu"}, "crops": {"crop": 0}}
    with pytest.raises(StageError, match=r"--only: the variant does not use mixup \(it uses: crops, flips, GELU\)"):
        chosen(uses, ["crops", "mixup"])


def test_shifted_test_time_augmentation_averages_six_views():
    model = built([8], 3, input_shape=(4, 4, 3))
    x = np.random.default_rng(1).uniform(size=(5, 4, 4, 3)).astype(np.float32)
    rows = np.array([1, 0, 1, 2])  # mirror-padded by one pixel: row -1 is row 1, row 4 is row 2
    down_right = x[:, rows][:, :, rows]  # the image moved one pixel down and right
    up_left = x[:, [1, 2, 3, 2]][:, :, [1, 2, 3, 2]]  # and one pixel up and left
    views = [evaluate.predict(model, view, tta=True) for view in (x, down_right, up_left)]
    expected = views[0] / 2 + (views[1] + views[2]) / 4
    np.testing.assert_allclose(evaluate.predict(model, x, tta="shifts"), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected, views[0])


def test_test_time_augmentation_averages_the_image_and_its_mirror():
    model = built([8], 3, input_shape=(4, 4, 3))
    x = np.random.default_rng(0).uniform(size=(5, 4, 4, 3)).astype(np.float32)
    plain, averaged = evaluate.predict(model, x, tta=False), evaluate.predict(model, x, tta=True)
    # Averaged over both views, a prediction no longer depends on which of the two it was given.
    np.testing.assert_allclose(evaluate.predict(model, x[:, :, ::-1], tta=True), averaged, rtol=1e-5, atol=1e-7)
    assert not np.allclose(plain, averaged)  # a dense network is not mirror-symmetric
    np.testing.assert_allclose(averaged.sum(axis=1), 1, rtol=1e-5)  # still probabilities
