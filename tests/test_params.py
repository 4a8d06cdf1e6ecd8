"""params.yaml read and validated (params.py), and the networks the project's variants build from it."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from support import PROJECT_PARAMS, TINY_CONV, project_params, tiny_params
from resnet_cifar import evaluate, train
from resnet_cifar.models import Network, build_model
from resnet_cifar.params import ParamsError, backend, data_params, load_params, variant_names, variant_spec
from resnet_cifar.stage import StageError


def cifar_shaped(count: int) -> np.ndarray:
    """Random images of CIFAR's shape, with a per-channel variance for standardization to divide by."""
    return np.random.default_rng(0).uniform(size=(count, 32, 32, 3)).astype(np.float32)


def project_model(name: str):
    """The network the train stage builds for variant `name` of the project's params.yaml."""
    spec = variant_spec(load_params(PROJECT_PARAMS), name)
    return spec, build_model(Network.of(spec), 10, cifar_shaped(1), name)


@pytest.mark.parametrize("name, parameters", [("baseline", 985_482), ("deeper", 3_216_778),
                                              ("dropout", 3_216_778), ("l2", 3_216_778)])
def test_the_assignments_variants_build_the_assignments_networks(name, parameters):
    spec, model = project_model(name)
    assert model.count_params() == parameters
    assert not any(isinstance(layer, keras.layers.Normalization) for layer in model.layers)
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == ([0.2] * 4 if name == "dropout" else [])
    factors = [round(float(layer.kernel_regularizer.l2), 6) for layer in model.layers
               if getattr(layer, "kernel_regularizer", None)]
    assert factors == ([0.001, 0.01, 0.01, 0.01] if name == "l2" else [])
    # The assignment's recipe: nothing beyond it is switched on.
    learning_rate = 1e-4 if name == "baseline" else 1e-3
    assert (spec.optimizer, spec.learning_rate, spec.epochs, spec.batch_size) == ("adam", learning_rate, 100, 256)
    assert not (spec.flip or spec.translate or spec.crop or spec.mixup or spec.standardize or spec.tta
                or spec.weight_decay or spec.warmup_epochs or spec.label_smoothing or spec.ema)
    assert spec.schedule == "constant" and spec.validation == "test"
    assert (spec.logit_scale, spec.norm_lr_factor) == (1.0, 1.0)


def test_tuned_is_still_a_dense_residual_network():
    _, model = project_model("tuned")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Flatten", "Dense", "Add"} <= kinds
    assert not {"Conv2D", "MultiHeadAttention"} & kinds


def test_a_conv_variant_builds_a_convolutional_residual_network():
    params = load_params(PROJECT_PARAMS)
    params["variants"]["conv"] = TINY_CONV
    images = cifar_shaped(16)
    model = build_model(Network.of(variant_spec(params, "conv")), 10, images, "conv")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Conv2D", "BatchNormalization", "Add", "GlobalAveragePooling2D"} <= kinds
    assert "Flatten" not in kinds


def test_the_conv_variant_is_airbench94_shaped():
    """Two convolutions a stage, no shortcut, a global max pool: airbench94's network."""
    params = load_params(PROJECT_PARAMS)
    images = cifar_shaped(64)
    model = build_model(Network.of(variant_spec(params, "conv")), 10, images, "conv")
    shapes = {name: model.get_layer(name).output.shape[1:] for name in
              ("stem_whiten_act", "stage1_conv_act", "stage1_block1_conv_act", "stage2_conv_act",
               "stage2_block1_conv_act", "stage3_conv_act", "stage3_block1_conv_act", "pool", "probabilities")}
    assert shapes == {"stem_whiten_act": (31, 31, 24), "stage1_conv_act": (15, 15, 64),
                      "stage1_block1_conv_act": (15, 15, 64), "stage2_conv_act": (7, 7, 256),
                      "stage2_block1_conv_act": (7, 7, 256), "stage3_conv_act": (3, 3, 256),
                      "stage3_block1_conv_act": (3, 3, 256), "pool": (256,), "probabilities": (10,)}
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalMaxPooling2D)
    assert not any(isinstance(layer, keras.layers.Add) for layer in model.layers)


def test_a_single_l2_factor_applies_to_every_transition_dense(tmp_path):
    params = project_params()
    params["variants"]["l2"]["l2"] = 0.01
    assert variant_spec(params, "l2").l2 == (0.01,) * 4


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        params = params[key]
    params[last] = value


def delete_key(params: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        params = params[key]
    del params[last]


BAD_VALUES = [
    ("seed", -1, "seed: expected an integer >= 0"),
    ("seed", "abc", "seed: expected an integer >= 0"),
    ("data.dataset", "cifar1000", "data.dataset: expected one of cifar10, cifar100"),
    ("data.label_mode", "medium", "data.label_mode: expected one of fine, coarse"),
    ("data.label_mode", "coarse", "data.label_mode: expected 'fine' for cifar10"),
    ("data.colour", "rgb", "data.colour: unknown key"),
    ("train.epochs", 0, "train.epochs: expected a positive integer, got 0"),
    ("train.epochs", 2.5, "train.epochs: expected a positive integer, got 2.5"),
    ("train.max_epochs", 0, "train.max_epochs: expected a positive integer, got 0"),
    ("variants.tuned.max_epochs", 2, "variants.tuned.max_epochs: unknown key"),
    ("train.batch_size", -8, "train.batch_size: expected a positive integer, got -8"),
    ("train.optimizer", "adagrad", "train.optimizer: expected one of adam, adamw, lion, sgd"),
    ("train.weight_decay", 0.05, "train.weight_decay: expected 0 with optimizer adam (its weight decay is decoupled: adamw, lion, sgd, nesterov, muon)"),
    ("train.weight_decay", -0.1, "train.weight_decay: expected a number in [0, inf)"),
    ("train.warmup_epochs", 100, "train.warmup_epochs: expected an integer in [0, epochs) = [0, 100)"),
    ("train.warmup_epochs", 1.5, "train.warmup_epochs: expected an integer in [0, epochs)"),
    ("train.schedule", "step", "train.schedule: expected one of constant, cosine"),
    ("train.arch", "vit", "train.arch: expected one of dense, conv, got 'vit'"),
    ("train.stem", 0, "train.stem: expected a positive number of filters, or whiten, got 0"),
    ("train.stem", "pca", "train.stem: expected a positive number of filters, or whiten, got 'pca'"),
    ("train.downsample", "avg", "train.downsample: expected one of stride, pool, pool_first"),
    ("train.conv_init", "zeros", "train.conv_init: expected one of he, dirac"),
    ("train.norm_momentum", 1.0, "train.norm_momentum: expected a number in [0, 1)"),
    ("train.norm_scale", "no", "train.norm_scale: expected true or false"),
    ("train.logit_scale", 0, "train.logit_scale: expected a number in (0, inf)"),
    ("train.norm_lr_factor", 64, "train.norm_lr_factor: expected 1 with optimizer adam (the factor is sgd's, nesterov's and muon's)"),
    ("variants.tuned.muon_lr_factor", 0.4, "variants.tuned.muon_lr_factor: expected 1 with optimizer adamw (the factor is muon's)"),
    ("train.muon_lr_factor", 0, "train.muon_lr_factor: expected a number in (0, inf)"),
    ("variants.tuned.momentum", 0.85, "variants.tuned.momentum: expected no momentum with optimizer adamw (a key of nesterov, muon), got 0.85"),
    ("train.momentum", 1.0, "train.momentum: expected a number in [0, 1)"),
    ("train.warmup_from", 0.2, "train.warmup_from: expected 0 without a warm-up (warmup_epochs 0), got 0.2"),
    ("variants.tuned.warmup_from", 1.0, "variants.tuned.warmup_from: expected a number in [0, 1)"),
    ("train.lookahead", "yes", "train.lookahead: expected true or false, got 'yes'"),
    ("variants.tuned.shortcuts", False, "variants.tuned.shortcuts: expected true with prenorm true (pre-activation blocks are residual), got False"),
    ("train.head_pool", "min", "train.head_pool: expected one of average, max, got 'min'"),
    ("variants.tuned.lookahead", True, "variants.tuned.lookahead: expected false with optimizer adamw (a key of sgd, nesterov, muon), got True"),
    ("variants.tuned.whiten_bias_epochs", 2, "variants.tuned.whiten_bias_epochs: expected 0 with optimizer adamw (a key of sgd, nesterov, muon)"),
    ("variants.conv.whiten_bias_epochs", 99, "variants.conv.whiten_bias_epochs: expected an integer in [0, epochs) = [0, "),
    ("train.whiten_bias_epochs", -1, "train.whiten_bias_epochs: expected an integer in [0, epochs), got -1"),
    ("variants.tuned.optimizer", "muon", "variants.tuned.optimizer: expected one of adam, adamw, lion, sgd, nesterov with arch dense (muon trains convolution filters), got 'muon'"),
    ("variants.conv.norm_lr_factor", -1, "variants.conv.norm_lr_factor: expected a number in (0, inf)"),
    ("train.crop", 16, "train.crop: expected an integer number of pixels in [0, 16)"),
    ("train.ema", 1.0, "train.ema: expected a number in [0, 1)"),
    ("train.tta", "yes", "train.tta: expected true, false or shifts, got 'yes'"),
    ("train.xla", "yes", "train.xla: expected true, false or auto, got 'yes'"),
    ("train.standardize", 1, "train.standardize: expected true or false, got 1"),
    ("variants.deeper.blocks", [1, 1, 1], "variants.deeper.blocks: expected 4 values (one per width), got 3"),
    ("variants.deeper.blocks", [1, -1, 1, 1], "variants.deeper.blocks[1]: expected an integer >= 0, got -1"),
    ("variants.dropout.arch", "conv", "variants.dropout.dropout: expected 0.0 with arch conv (a dense network's key)"),
    ("variants.l2.arch", "conv", "variants.l2.l2: expected (0.0, 0.0, 0.0, 0.0) with arch conv"),
    ("train.label_smoothing", 1, "train.label_smoothing: expected a number in [0, 1)"),
    ("train.precision", "float64", "train.precision: expected one of auto, float32, bfloat16, float16"),
    ("train.devices", "gpu", "train.devices: expected auto, cpu or a list of distinct GPU indices, got 'gpu'"),
    ("train.devices", [0, 0], "train.devices: expected auto, cpu or a list of distinct GPU indices, got [0, 0]"),
    ("train.devices", [], "train.devices: expected auto, cpu or a list of distinct GPU indices, got []"),
    ("train.blocks", 0, "train.blocks: expected a positive integer, got 0"),
    ("train.expansion", 0, "train.expansion: expected a number in (0, inf)"),
    ("train.activation", "tanh", "train.activation: expected one of relu, gelu"),
    ("train.norm", "group", "train.norm: expected one of none, layer, batch"),
    ("train.prenorm", "yes", "train.prenorm: expected true or false, got 'yes'"),
    ("train.flip", 1, "train.flip: expected true, false or alternate, got 1"),
    ("train.flip", "random", "train.flip: expected true, false or alternate, got 'random'"),
    ("train.translate", 16, "train.translate: expected an integer number of pixels in [0, 16)"),
    ("train.translate", -2, "train.translate: expected an integer number of pixels in [0, 16)"),
    ("train.mixup", -0.2, "train.mixup: expected a number in [0, inf)"),
    ("variants.deeper.blocks", 2.5, "variants.deeper.blocks: expected a positive integer"),
    ("train.learning_rate", 0, "train.learning_rate: expected a number in (0, inf)"),
    ("train.learning_rate", "fast", "train.learning_rate: expected a number"),
    ("train.validation", 1.5, "train.validation: expected 'test' or a fraction"),
    ("train.validation", "val", "train.validation: expected 'test' or a fraction"),
    ("train.dropout", 1.0, "train.dropout: expected a number in [0, 1)"),
    ("train.beta", 0.9, "train.beta: unknown key"),
    ("variants.l2.l2", [0.001, 0.01, 0.01], "variants.l2.l2: expected 4 values (one per width), got 3"),
    ("variants.l2.l2", [0.001, -0.01, 0.01, 0.01], "variants.l2.l2[1]: expected a number in [0, inf)"),
    ("variants.dropout.dropout", -0.1, "variants.dropout.dropout: expected a number in [0, 1)"),
    ("variants.deeper.widths", [], "variants.deeper.widths: expected a non-empty list"),
    ("variants.deeper.widths", [512, 0], "variants.deeper.widths[1]: expected a positive integer"),
    ("variants.deeper.widths", "512", "variants.deeper.widths: expected a non-empty list"),
    ("variants.deeper.depth", 4, "variants.deeper.depth: unknown key"),
    ("variants.deeper.epochs", -1, "variants.deeper.epochs: expected a positive integer"),
    ("variants.baseline", [256], "variants.baseline: expected a mapping"),
    ("variantz", {}, "variantz: unknown key"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_values_are_named_by_their_key(tmp_path, key, value, message):
    params = project_params()
    set_key(params, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="^" + re.escape(f"params.yaml: {message}")):
        checked = load_params(path)
        data_params(checked)
        for name in variant_names(checked):
            variant_spec(checked, name)


@pytest.mark.parametrize("key", ["seed", "data.dataset", "train.epochs", "variants.baseline.widths"])
def test_missing_keys_are_named(tmp_path, key):
    params = project_params()
    delete_key(params, key)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=f"params.yaml: {key}: missing"):
        checked = load_params(path)
        data_params(checked)
        variant_spec(checked, "baseline")


def test_the_backend_is_one_for_every_variant():
    params = project_params()
    assert backend(params) == "tensorflow"
    params["train"]["backend"] = "mxnet"
    with pytest.raises(ParamsError, match=re.escape("params.yaml: train.backend: expected one of tensorflow, jax, "
                                                    "torch, got 'mxnet'")):
        backend(params)
    params["train"]["backend"] = "jax"
    params["variants"]["baseline"]["backend"] = "torch"
    with pytest.raises(ParamsError, match="params.yaml: variants.baseline.backend: unknown key"):
        variant_spec(params, "baseline")


def test_max_epochs_caps_every_variant_and_shortens_its_warmup_and_decay():
    params = project_params()
    params["train"]["max_epochs"] = 2
    capped = {name: variant_spec(params, name) for name in variant_names(params)}
    assert {name: spec.epochs for name, spec in capped.items()} == dict.fromkeys(params["variants"], 2)
    # tuned warms up for 3 of its 150 epochs: capped at 2, it warms up for 1, then decays to 0 by the end
    assert (capped["tuned"].warmup_epochs, capped["tuned"].schedule) == (1, "cosine")
    params["train"]["max_epochs"] = 120  # above some variants' epochs: those keep their own
    assert variant_spec(params, "tuned").epochs == 120 and variant_spec(params, "baseline").epochs == 100


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ParamsError, match=r"variants.huge: no such variant \(have: baseline, deeper"):
        variant_spec(load_params(PROJECT_PARAMS), "huge")


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(broken)


def test_each_stage_validates_params_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    params["variants"]["small"]["widths"] = [16, -1]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for stage in (train, evaluate):
        with pytest.raises(StageError, match=r"variants.small.widths\[1\]: expected a positive integer"):
            stage.main(["small"])
    assert variant_spec(load_params(), "deep").widths == (16, 8)
