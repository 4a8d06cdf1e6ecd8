"""Seconds per training epoch of the assignment's baseline model, two code paths side by side.

    python bench/bench_train.py [--epochs 5]

(a) the assignment's own path: the functional model fed float32 numpy arrays, `model.fit` defaults;
(b) the `train` stage's path: `train.compiled_model` fed by `train.shuffled_batches`.
Both train the baseline (985,482 parameters, batch 256) on data/prepared/ when it exists (run
`dvc repro prepare` first), else on random data of CIFAR-10's shape. Prints the median seconds
per epoch after the first (which includes tracing), the ratio, the achieved GFLOP/s (6 x
parameters x images per epoch) and, as the ceiling, the measured peak of a large matmul in
float32 and bfloat16 on this machine. Run it on an otherwise idle machine.
"""

import argparse
import math
import time

import keras
import numpy as np
import tensorflow as tf

from resnet_cifar import train
from resnet_cifar.models import build_model
from resnet_cifar.params import VariantSpec
from resnet_cifar.prepare import PREPARED_DIR, load_prepared

BASELINE = VariantSpec(name="baseline", seed=0, widths=(256, 128), dropout=0.0, l2=(0.0, 0.0),
                       epochs=1, batch_size=256, optimizer="adam", learning_rate=1e-4, validation="test")


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def training_data() -> tuple[np.ndarray, np.ndarray, str]:
    if (PREPARED_DIR / "x_train.npy").is_file():
        data = load_prepared()
        return data["x_train"], data["y_train"], f"{PREPARED_DIR}/"
    rng = np.random.default_rng(0)
    x = rng.random((50_000, 32, 32, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 50_000), 10)
    return x, y, "random data of CIFAR-10's shape"


def assignment_path(x: np.ndarray, y: np.ndarray, epochs: int) -> list[float]:
    model = build_model(BASELINE.widths, num_classes=10)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(x, y, batch_size=256, epochs=epochs, verbose=0, callbacks=[timer])
    return timer.seconds


def train_stage_path(x: np.ndarray, y: np.ndarray, epochs: int) -> list[float]:
    model = train.compiled_model(BASELINE, x.shape[1:], y.shape[1])
    timer = EpochTimer()
    model.fit(train.shuffled_batches(x, y, BASELINE.batch_size, BASELINE.seed, 0, epochs),
              steps_per_epoch=math.ceil(len(x) / BASELINE.batch_size), epochs=epochs, verbose=0,
              callbacks=[timer])
    return timer.seconds


def matmul_gflops(dtype: tf.DType, n: int = 4096, repeats: int = 10) -> float:
    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    tf.matmul(a, a).numpy()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        product = tf.matmul(a, a)
    product.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per path (the first is not counted)")
    epochs = parser.parse_args().epochs
    x, y, source = training_data()
    flops_per_epoch = 6 * build_model(BASELINE.widths, num_classes=10).count_params() * len(x)
    print(f"baseline model, batch 256, {len(x):,} images from {source}, {epochs} epochs per path")

    medians = {}
    for label, path in (("(a) assignment: numpy float32, model.fit defaults", assignment_path),
                        ("(b) train stage: shuffled_batches", train_stage_path)):
        seconds = path(x, y, epochs)
        medians[label] = float(np.median(seconds[1:]))
        print(f"{label}: {medians[label]:.2f} s/epoch, {flops_per_epoch / medians[label] / 1e9:.0f} GFLOP/s "
              f"(epochs: {', '.join(f'{s:.2f}' for s in seconds)})")
    (a, b) = medians.values()
    print(f"speed-up of (b) over (a): {a / b:.2f}x")
    for dtype in (tf.float32, tf.bfloat16):
        print(f"peak matmul 4096x4096 {dtype.name}: {matmul_gflops(dtype):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
