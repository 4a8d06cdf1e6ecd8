"""Stage `evaluate@<variant>`: the assignment's loss and accuracy on train and test, and more.

    python -m resnet_cifar.evaluate <variant>

Writes metrics/variants/<variant>/evaluate.json (train/test loss and accuracy, per-class test
accuracy, top-5 accuracy when there are 100 classes, the train stage's times and what it ran on) and confusion.csv (one row per test image,
for DVC's confusion-matrix plot). With the variant's `tta`, every prediction is the mean of the
predictions for the image and its mirror image (and with `shifts`, of those shifted by a pixel; tta.py).
"""

import csv
import json
import zipfile
from pathlib import Path

import keras
import numpy as np

from resnet_cifar import models  # noqa: F401 (registers the custom layers a saved model may hold)
from resnet_cifar.params import backend, load_params, variant_spec
from resnet_cifar.paths import confusion_path, evaluate_path, model_path, timing_path
from resnet_cifar.datasets import SPLITS, load_prepared
from resnet_cifar.progress import Boundaries
from resnet_cifar.runtime import check_backend, quiet_graph_optimizer
from resnet_cifar.stage import StageError, all_or_nothing, atomic_path, interrupts_at_boundaries, run
from resnet_cifar.tta import BATCH_SIZE, accuracy, predict


def load_trained(path: Path) -> keras.Model:
    try:
        return keras.models.load_model(path, compile=False)  # predictions need no optimizer
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise StageError(f"{path}: cannot load the model ({err}); "
                         f"rebuild it with `dvc repro -f train@{path.stem}`") from None


def per_class_accuracy(true_ids: np.ndarray, predicted_ids: np.ndarray, classes: list[str]) -> dict:
    """Accuracy on each class's test images (None for a class without any)."""
    return {name: round(float(np.mean(predicted_ids[true_ids == i] == i)), 4) if np.any(true_ids == i)
            else None for i, name in enumerate(classes)}


def top_k_accuracy(true_ids: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    top_k = np.argsort(probabilities, axis=1)[:, -k:]
    return float(np.mean(np.any(top_k == true_ids[:, None], axis=1)))


def cross_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean categorical cross-entropy, with probabilities clipped as Keras clips them."""
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(np.mean(-np.sum(labels * np.log(clipped), axis=1)))


def evaluate(model: keras.Model, data: dict, tta: bool = False,
             callbacks: tuple = ()) -> tuple[dict, np.ndarray, np.ndarray]:
    """The metrics, with the test set's true and predicted class ids; `callbacks` see every batch."""
    # The assignment's loss (model.evaluate's): cross-entropy plus the L2 penalty of regularized
    # variants; without the label smoothing a variant may train with, so all stay comparable.
    penalty = sum(float(loss) for loss in model.losses)
    probabilities = {split: predict(model, data[f"x_{split}"], tta, callbacks) for split in SPLITS}
    metrics = {}
    for split in SPLITS:
        labels = data[f"y_{split}"]
        loss = cross_entropy(labels, probabilities[split]) + penalty
        correct = accuracy(probabilities[split], labels)
        metrics[split] = {"loss": round(loss, 4), "accuracy": round(correct, 4)}
        print(f"{split}: loss {loss:.4f}, accuracy {correct:.4f}")
    metrics["overfit_gap"] = round(metrics["train"]["accuracy"] - metrics["test"]["accuracy"], 4)

    true_ids = np.argmax(data["y_test"], axis=1)
    predicted_ids = np.argmax(probabilities["test"], axis=1)
    metrics["test"]["per_class_accuracy"] = per_class_accuracy(true_ids, predicted_ids, data["classes"])
    if len(data["classes"]) == 100:
        metrics["test"]["top5_accuracy"] = round(top_k_accuracy(true_ids, probabilities["test"], 5), 4)
    return metrics, true_ids, predicted_ids


def write_confusion(path: Path, true_ids: np.ndarray, predicted_ids: np.ndarray,
                    classes: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[t], classes[p]) for t, p in zip(true_ids, predicted_ids))


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise StageError("usage: python -m resnet_cifar.evaluate <variant>")
    params = load_params()
    check_backend(backend(params))
    spec = variant_spec(params, argv[0])  # validates the variant's params
    variant = spec.name
    data = load_prepared()
    quiet_graph_optimizer()
    with interrupts_at_boundaries():
        metrics, true_ids, predicted_ids = evaluate(load_trained(model_path(variant)), data, spec.tta,
                                                    (Boundaries(variant, BATCH_SIZE),))
    # The train stage's outputs live in the DVC cache (a remote restores them without retraining);
    # its times, and what it ran on, join the results kept in git, for `dvc metrics diff` in pull requests.
    timing = json.loads(timing_path(variant).read_text())
    metrics["train_time"] = {key: value for key, value in timing.items() if isinstance(value, (int, float))}
    metrics["ran_on"] = timing["ran_on"]
    with all_or_nothing(evaluate_path(variant), confusion_path(variant)):
        with atomic_path(evaluate_path(variant)) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        write_confusion(confusion_path(variant), true_ids, predicted_ids, data["classes"])
    print(f"wrote {evaluate_path(variant)} and {confusion_path(variant)}")


if __name__ == "__main__":
    run(main)
