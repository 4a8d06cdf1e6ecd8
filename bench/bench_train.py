"""Seconds per training epoch of the assignment's baseline model, code paths side by side.

    python bench/bench_train.py [--epochs 5] [--levers]
    python bench/bench_train.py --variant conv [--epochs 3] [--images 10000] [--precisions float32]
    python bench/bench_train.py --variant tuned --input [--epochs 3] [--images 10000]
    python bench/bench_train.py --backends [baseline conv] [--epochs 3] [--images 10000]
    python bench/bench_train.py --epoch-seconds conv [--epochs 3] [--images 10000]

(a) the assignment's own path: the functional model fed float32 numpy arrays, `model.fit` defaults;
(b) the `train` stage's path: `train.compiled_model` fed by `batches.TrainingBatches`, at the
    precision and XLA setting params.yaml's `auto` resolves to here.
With --levers, (b) again with one lever at a time taken back or added: float32 instead of
bfloat16, one epoch or one step per call instead of about a second's worth, XLA compilation
switched the other way, grappler's remapper on (the stage turns it off: runtime.quiet_graph_optimizer).
All train the baseline (985,482 parameters, batch 256) on data/prepared/ when it exists (run
`dvc repro prepare` first), else on random data of CIFAR-10's shape. Prints the median seconds
per epoch after the first (which includes tracing), the speed-up over (a), the achieved GFLOP/s
(training_flops: three times the forward pass's, x images per epoch) and, as the ceiling, the measured peak of a large matmul in
float32 and bfloat16 on this machine with the epoch time it would allow. Run it on an otherwise
idle machine.

With --variant, times the train stage's path of that variant of params.yaml instead, in bfloat16
and in float32 (or --precisions), each with XLA and without, side by side, next to the baseline's,
on the first --images training images, and prints the seconds a full epoch would take, the ratio
to the baseline's first epoch time and the GFLOP/s achieved next to a large matmul's in the same
precision.

With --input, measures the input pipeline's share of that variant's epoch (at the precision `auto`
resolves to): the seconds of the pipeline alone, of training fed by it, and of training on the
same batches replayed from memory; the share is the time training would save if its input were
free.

With --backends, times the train stage's path of each named variant on every installed Keras
backend, side by side (each backend in a process of its own: Keras picks it once, when imported),
at the precision `auto` resolves to. --epoch-seconds prints that time for one variant on the
backend of this process: its training steps alone, without the validation pass after each epoch.
"""

import argparse
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import time

import keras
import numpy as np

from resnet_cifar import runtime, train
from resnet_cifar.batches import TrainingBatches
from resnet_cifar.datasets import load_prepared
from resnet_cifar.models import Network, build_model
from resnet_cifar.params import BACKENDS, VariantSpec, load_params, variant_spec
from resnet_cifar.paths import PREPARED_DIR


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


def assignment_path(x: np.ndarray, y: np.ndarray, spec: VariantSpec) -> list[float]:
    # No keras.utils.set_random_seed here: once it is called, model.fit(shuffle=True) replays one
    # batch order in every epoch, which the assignment's notebook (NumPy seeded only) did not.
    model = build_model(Network.of(spec), 10, x, spec.name)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(x, y, batch_size=256, epochs=spec.epochs, verbose=0, callbacks=[timer])
    return timer.seconds


def train_stage_path(x: np.ndarray, y: np.ndarray, spec: VariantSpec, steps_per_call: int | None = None,
                     batches: keras.utils.PyDataset | None = None) -> list[float]:
    """Epoch times of the train stage's model, input pipeline and pace (about a second per call:
    train.fit) for a resolved `spec` (train.resolved); steps_per_call fixes the pace, to measure
    that lever; `batches` replaces the input pipeline."""
    steps_per_epoch = math.ceil(len(x) / spec.batch_size)
    with runtime.precision_policy(spec.precision):
        model = train.compiled_model(spec, x, y.shape[1], steps_per_epoch)
        stage_batches = TrainingBatches(x, y, spec, first_epoch=0)
        train.pace(model, steps_per_call or runtime.steps_per_call(
            steps_per_epoch, lambda: train.step_seconds(model, stage_batches), replicas=1))
        timer = EpochTimer()
        model.fit(stage_batches if batches is None else batches, steps_per_epoch=steps_per_epoch,
                  epochs=spec.epochs, shuffle=False, verbose=0, callbacks=[timer])
    return timer.seconds


def with_remapper(path) -> list[float]:
    """Epoch times of `path` with grappler's remapper on, as TensorFlow has it by default."""
    import tensorflow as tf  # a lever of TensorFlow's alone
    tf.config.optimizer.set_experimental_options({"remapping": True})
    try:
        return path()
    finally:
        runtime.quiet_graph_optimizer()


def matmul_gflops(dtype: str, n: int = 4096, repeats: int = 10) -> float:
    """The machine's rate for a large matmul in `dtype`: the backend's, or in float32 NumPy's BLAS
    where that is faster (on 2 AVX2 cores it reached twice TensorFlow's)."""
    def rate(matmul, a) -> float:
        matmul(a)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            matmul(a)
        return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9
    backend = rate(lambda a: keras.ops.convert_to_numpy(keras.ops.matmul(a, a)),
                   keras.ops.cast(keras.random.normal((n, n)), dtype))
    if dtype != "float32":
        return backend
    return max(backend, rate(lambda a: a @ a, np.random.default_rng(0).random((n, n), dtype=np.float32)))


def training_flops(model: keras.Model) -> int:
    """The multiply-adds of one image's training step, times two: its convolutions and Dense layers
    forward, and about twice that backward."""
    forward = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, channels_in, channels_out = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            forward += 2 * height * width * kernel_h * kernel_w * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            forward += 2 * math.prod(layer.kernel.shape) * math.prod(layer.output.shape[1:-1])
    return 3 * forward


def compare_precisions(variant: str, epochs: int, images: int, precisions: list[str]) -> None:
    """Full-epoch seconds of `variant` and of the baseline in each of `precisions`, with XLA and
    without, measured on the first `images` training images, and the GFLOP/s each achieves next to
    a large matmul's in that precision on this machine."""
    x, y, source = training_data()
    x, y = x[:images], y[:images]
    scale = 50_000 / len(x)
    print(f"{variant} vs baseline, train stage path, {len(x):,} images from {source}, {epochs} epochs "
          "each (the first is not counted), seconds scaled to 50,000 images")
    peaks = {precision: matmul_gflops(precision) for precision in precisions}
    params = load_params()
    first_seconds = None
    for name in ("baseline", variant):
        spec = variant_spec(params, name)
        flops = training_flops(build_model(Network.of(spec), 10, x, name)) * 50_000
        for precision in precisions:
            for xla in (False, True):
                run_spec = dataclasses.replace(spec, epochs=epochs, precision=precision, xla=xla)
                seconds = float(np.median(train_stage_path(x, y, run_spec)[1:])) * scale
                first_seconds = first_seconds or seconds
                print(f"{name} in {precision}{' with XLA' if xla else ''}: {seconds:.1f} s/epoch, "
                      f"{flops / seconds / 1e9:.0f} GFLOP/s (a matmul: {peaks[precision]:.0f}), "
                      f"{seconds / first_seconds:.1f}x the baseline's {precisions[0]} epoch without XLA", flush=True)


class Replay(keras.utils.PyDataset):
    """One epoch's batches, computed before, served again for `epochs` epochs."""

    def __init__(self, batches: list, epochs: int):
        super().__init__()
        self.batches, self.epochs = batches, epochs

    @property
    def num_batches(self) -> int:
        return len(self.batches) * self.epochs

    def __getitem__(self, index: int):
        return self.batches[index % len(self.batches)]


def input_share(variant: str, epochs: int, images: int) -> None:
    """The input pipeline's share of the variant's training epoch, measured on `images` images."""
    x, y, source = training_data()
    x, y = x[:images], y[:images]
    scale = 50_000 / len(x)
    spec = stage_spec(variant, epochs)
    steps_per_epoch = math.ceil(len(x) / spec.batch_size)
    print(f"{variant}'s input pipeline, {len(x):,} images from {source}, {spec.precision}, {epochs} epochs "
          "each (the first is not counted), seconds scaled to 50,000 images")
    pipeline = TrainingBatches(x, y, spec, first_epoch=0)
    started = time.perf_counter()
    first_epoch = [pipeline[step] for step in range(steps_per_epoch)]
    alone = (time.perf_counter() - started) * scale
    fed = float(np.median(train_stage_path(x, y, spec)[1:])) * scale
    replayed = float(np.median(train_stage_path(x, y, spec, batches=Replay(first_epoch, epochs))[1:])) * scale
    print(f"the pipeline alone: {alone:.1f} s/epoch; training fed by it: {fed:.1f} s/epoch; training on "
          f"batches replayed from memory: {replayed:.1f} s/epoch; the pipeline's share: {1 - replayed / fed:.0%}")


def stage_spec(variant: str, epochs: int) -> VariantSpec:
    """params.yaml's variant as the train stage resolves it on this machine, for `epochs` epochs."""
    spec = variant_spec(load_params(), variant)
    return dataclasses.replace(train.resolved(spec, runtime.use_devices(spec.devices)), epochs=epochs)


def epoch_seconds(variant: str, epochs: int, images: int) -> float:
    """The median seconds of the variant's epochs after the first on this process's backend, at
    the precision `auto` resolves to, measured on `images` images and scaled to 50,000."""
    x, y, _ = training_data()
    x, y = x[:images], y[:images]
    return float(np.median(train_stage_path(x, y, stage_spec(variant, epochs))[1:])) * 50_000 / len(x)


def compare_backends(variants: list[str], epochs: int, images: int) -> None:
    installed = [name for name in BACKENDS if importlib.util.find_spec(name) is not None]
    print(f"the train stage's path on {', '.join(installed)}: {images:,} images, {epochs} epochs each (the first "
          "is not counted), seconds scaled to 50,000 images")
    for variant in variants:
        seconds = {}
        for backend in installed:
            timed = subprocess.run([sys.executable, __file__, "--epoch-seconds", variant, "--epochs", str(epochs),
                                    "--images", str(images)], env=os.environ | {"KERAS_BACKEND": backend},
                                   capture_output=True, text=True, check=True)
            seconds[backend] = float(timed.stdout.split()[-1])
        first = installed[0]
        print(f"{variant}: " + "; ".join(f"{backend} {s:.1f} s/epoch ({s / seconds[first]:.2f}x {first})"
                                         for backend, s in seconds.items()), flush=True)


def timed_paths(x: np.ndarray, y: np.ndarray, spec: VariantSpec, levers: bool) -> dict:
    """The paths to time, by label: (a) and (b), and with `levers` (b) with each lever changed."""
    paths = {"(a) assignment: numpy float32, model.fit defaults": lambda: assignment_path(x, y, spec),
             f"(b) train stage: {spec.precision}, about a second per call": lambda: train_stage_path(x, y, spec)}
    if levers:
        float32_spec = dataclasses.replace(spec, precision="float32")
        paths |= {"(b) in float32": lambda: train_stage_path(x, y, float32_spec),
                  "(b) with one epoch per call": lambda: train_stage_path(x, y, spec,
                      steps_per_call=math.ceil(len(x) / spec.batch_size)),
                  "(b) with one step per call": lambda: train_stage_path(x, y, spec, steps_per_call=1),
                  f"(b) {'without' if spec.xla else 'with'} XLA":
                      lambda: train_stage_path(x, y, dataclasses.replace(spec, xla=not spec.xla)),
                  "(b) with grappler's remapper on": lambda: with_remapper(lambda: train_stage_path(x, y, spec))}
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per path (the first is not counted)")
    parser.add_argument("--levers", action="store_true", help="also time (b) with each lever changed")
    parser.add_argument("--variant", help="time this variant in bfloat16 and float32, with XLA and without, instead")
    parser.add_argument("--precisions", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                        help="with --variant: the precisions to time")
    parser.add_argument("--images", type=int, default=10_000, help="with --variant: training images used")
    parser.add_argument("--input", action="store_true", help="with --variant: the input pipeline's share of an epoch")
    parser.add_argument("--backends", nargs="*", metavar="VARIANT",
                        help="time these variants (default: baseline conv) on every installed backend")
    parser.add_argument("--epoch-seconds", metavar="VARIANT",
                        help="print the seconds of a training epoch of VARIANT (of 50,000 images) here")
    args = parser.parse_args()
    runtime.quiet_graph_optimizer()  # as the train stage
    if args.epoch_seconds:
        print(epoch_seconds(args.epoch_seconds, args.epochs, args.images))
        return
    if args.backends is not None:
        compare_backends(args.backends or ["baseline", "conv"], args.epochs, args.images)
        return
    if args.input:
        input_share(args.variant or "tuned", args.epochs, args.images)
        return
    if args.variant:
        compare_precisions(args.variant, args.epochs, args.images, args.precisions)
        return
    baseline = stage_spec("baseline", args.epochs)
    x, y, source = training_data()
    flops_per_epoch = training_flops(build_model(Network.of(baseline), 10, x, baseline.name)) * len(x)
    print(f"baseline model, batch {baseline.batch_size}, {len(x):,} images from {source}, "
          f"{args.epochs} epochs per path")

    paths = timed_paths(x, y, baseline, args.levers)
    medians = {}
    for label, path in paths.items():
        seconds = path()
        medians[label] = float(np.median(seconds[1:]))
        print(f"{label}: {medians[label]:.2f} s/epoch, {flops_per_epoch / medians[label] / 1e9:.0f} GFLOP/s, "
              f"{next(iter(medians.values())) / medians[label]:.2f}x (a) "
              f"(epochs: {', '.join(f'{s:.2f}' for s in seconds)})")
    for dtype in ("float32", "bfloat16"):
        peak = matmul_gflops(dtype)
        print(f"peak matmul 4096x4096 {dtype}: {peak:.0f} GFLOP/s, "
              f"{flops_per_epoch / peak / 1e9:.2f} s/epoch at that rate")


if __name__ == "__main__":
    main()
