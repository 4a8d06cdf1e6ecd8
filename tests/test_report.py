"""The report stage (report.py)."""

from pathlib import Path

import numpy as np

from resnet_cifar.params import load_params, variant_spec
from resnet_cifar.report import Result, overview


def test_report_compares_each_variant_with_its_closest_predecessor():
    from resnet_cifar.report import changed_fields, verdict
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    baseline, deeper, dropout, l2 = (variant_spec(params, name) for name in ("baseline", "deeper", "dropout", "l2"))
    assert changed_fields(baseline, deeper) == ["widths", "learning_rate"]
    assert changed_fields(deeper, dropout) == ["dropout"]
    assert changed_fields(deeper, l2) == ["l2"]
    assert verdict(0.02, -0.1) == "raised test accuracy and reduced overfitting"
    assert verdict(-0.001, 0.05) == "made no real difference to test accuracy and increased overfitting"


def test_the_overview_has_a_sentence_for_every_variant_naming_both_train_accuracies():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")

    def result(name: str, validation: list[float], evaluated_train: float) -> Result:
        history = {"eval/accuracy": np.array(validation), "train/accuracy": np.array([0.3, 0.6])}
        evaluation = {"train": {"accuracy": evaluated_train}, "test": {"accuracy": validation[-1]},
                      "overfit_gap": evaluated_train - validation[-1]}
        return Result(variant_spec(params, name), history, {}, {"train_seconds": 60.0}, evaluation)

    lines = overview([result("baseline", [0.5, 0.4], 0.9), result("conv", [0.4, 0.5], 0.7)])
    assert lines[1:3] == [
        "baseline: validation accuracy peaked at 0.5000 in epoch 1 of 2 and ended at 0.4000; train accuracy "
        "0.6000 on the last epoch's training batches (as trained: augmented, with dropout), 0.9000 on the "
        "training images as evaluated (the table's).",
        "conv: validation accuracy highest in the last epoch, 2, at 0.5000; train accuracy 0.6000 on the last "
        "epoch's training batches (as trained: augmented, with dropout), 0.7000 on the training images as "
        "evaluated (the table's)."]
