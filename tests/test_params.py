import re
from pathlib import Path

import pytest
import yaml

from resnet_cifar.params import ParamsError, data_params, load_params, variant_names, variant_spec

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def project_params() -> dict:
    return yaml.safe_load(PROJECT_PARAMS.read_text())


def test_project_params_describe_the_assignments_variants():
    params = load_params(PROJECT_PARAMS)
    assert variant_names(params) == ["baseline", "deeper", "dropout", "l2"]
    baseline, deeper, dropout, l2 = (variant_spec(params, name) for name in variant_names(params))
    assert (baseline.widths, baseline.learning_rate) == ((256, 128), 1e-4)
    assert (baseline.epochs, baseline.batch_size, baseline.optimizer) == (100, 256, "adam")
    assert baseline.validation == "test" and baseline.dropout == 0 and baseline.l2 == (0, 0)
    assert (deeper.widths, deeper.learning_rate) == ((512, 512, 256, 128), 1e-3)
    assert dropout.dropout == 0.2 and dropout.widths == deeper.widths
    assert l2.l2 == (0.001, 0.01, 0.01, 0.01) and l2.dropout == 0
    assert data_params(params).dataset == "cifar10"


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
    ("train.batch_size", -8, "train.batch_size: expected a positive integer, got -8"),
    ("train.optimizer", "adagrad", "train.optimizer: expected one of adam, sgd"),
    ("train.learning_rate", 0, "train.learning_rate: expected a number in (0, inf)"),
    ("train.learning_rate", "fast", "train.learning_rate: expected a number"),
    ("train.validation", 1.5, "train.validation: expected 'test' or a fraction"),
    ("train.validation", "val", "train.validation: expected 'test' or a fraction"),
    ("train.dropout", 1.0, "train.dropout: expected a number in [0, 1)"),
    ("train.momentum", 0.9, "train.momentum: unknown key"),
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
