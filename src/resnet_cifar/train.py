"""Stage `train@<variant>`: build the variant's network, fit it, log every epoch with DVCLive.

    python -m resnet_cifar.train <variant>

Writes models/<variant>.keras, and under metrics/variants/<variant>/ the DVCLive history
(train/) and the model summary (summary.txt).
"""

import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from resnet_cifar.models import build_model
from resnet_cifar.params import VariantSpec, load_params, variant_spec
from resnet_cifar.prepare import load_prepared
from resnet_cifar.stage import StageError, atomic_path, run

MODELS_DIR = Path("models")
VARIANTS_DIR = Path("metrics/variants")
OPTIMIZERS = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}


def model_path(variant: str) -> Path:
    return MODELS_DIR / f"{variant}.keras"


def live_dir(variant: str) -> Path:
    return VARIANTS_DIR / variant / "train"


def timing_path(variant: str) -> Path:
    return VARIANTS_DIR / variant / "train_time.json"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TF ops deterministic, for repeatable runs."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def split_validation(data: dict, validation: str | float, seed: int):
    """(x_fit, y_fit), (x_val, y_val): the test set as the assignment, or a held-out fraction."""
    if validation == "test":
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
    order = np.random.default_rng(seed).permutation(len(data["x_train"]))
    n_val = max(1, round(validation * len(order)))
    fit, val = order[n_val:], order[:n_val]
    return (data["x_train"][fit], data["y_train"][fit]), (data["x_train"][val], data["y_train"][val])


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch with the metrics, seconds per epoch and the time left."""

    def __init__(self, variant: str, epochs: int):
        super().__init__()
        self.variant, self.epochs = variant, epochs
        self.epoch_seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self.started)
        left = (self.epochs - epoch - 1) * float(np.median(self.epoch_seconds))
        values = "  ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
        print(f"[{self.variant}] epoch {epoch + 1}/{self.epochs}  {values}  "
              f"{self.epoch_seconds[-1]:.1f}s  ~{left / 60:.1f} min left", flush=True)


class StopOnDivergence(keras.callbacks.Callback):
    """Stop with a clear error, and save nothing, once the training loss is NaN or infinite."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss", 0.0)
        if not np.isfinite(loss):
            raise StageError(f"variant {self.variant}: training diverged (loss {loss}) in epoch "
                             f"{epoch + 1}; lower its learning_rate in params.yaml")


def train(spec: VariantSpec, data: dict) -> None:
    """Fit the variant and write its model, summary and DVCLive history."""
    seed_everything(spec.seed)
    (x_fit, y_fit), validation_data = split_validation(data, spec.validation, spec.seed)
    model = build_model(spec.widths, num_classes=y_fit.shape[1], input_shape=x_fit.shape[1:],
                        dropout=spec.dropout, l2=spec.l2, name=spec.name)
    model.compile(
        optimizer=OPTIMIZERS[spec.optimizer](learning_rate=spec.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    summary_lines: list[str] = []
    model.summary(print_fn=lambda line, **_: summary_lines.append(line))
    print("\n".join(summary_lines))

    progress = EpochProgress(spec.name, spec.epochs)
    started = time.perf_counter()
    try:
        with Live(str(live_dir(spec.name)), dvcyaml=None, save_dvc_exp=False) as live:
            live.summary["parameters"] = model.count_params()
            model.fit(x_fit, y_fit, batch_size=spec.batch_size, epochs=spec.epochs,
                      validation_data=validation_data, verbose=0,
                      callbacks=[StopOnDivergence(spec.name), DVCLiveCallback(live=live), progress])
    except BaseException:
        # A diverged or interrupted run must not leave a history that looks like a result.
        shutil.rmtree(live_dir(spec.name), ignore_errors=True)
        raise
    timing = {"train_seconds": round(time.perf_counter() - started, 1),
              "seconds_per_epoch": round(float(np.median(progress.epoch_seconds)), 2)}

    with atomic_path(model_path(spec.name)) as tmp:
        model.save(tmp)
    # Wall times vary between runs, so they stay out of DVCLive's metrics.json.
    with atomic_path(timing_path(spec.name)) as tmp:
        tmp.write_text(json.dumps(timing, indent=2) + "\n")
    (VARIANTS_DIR / spec.name / "summary.txt").write_text("\n".join(summary_lines) + "\n")
    print(f"wrote {model_path(spec.name)} ({model.count_params():,} parameters)")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise StageError("usage: python -m resnet_cifar.train <variant>")
    spec = variant_spec(load_params(), argv[0])
    train(spec, load_prepared())


if __name__ == "__main__":
    run(main)
