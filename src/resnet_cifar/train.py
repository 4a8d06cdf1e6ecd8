"""Stage `train@<variant>`: build the variant's network, fit it, log every epoch with DVCLive.

    python -m resnet_cifar.train <variant>

Writes models/<variant>.keras, and under metrics/variants/<variant>/ the DVCLive history
(train/), the wall times (train_time.json) and the model summary (summary.txt).

Every epoch ends with a checkpoint (checkpoint.py). A run that was killed resumes from it, and ends
exactly as an uninterrupted run would: the batches of each epoch are shuffled and augmented by
(seed, epoch) alone, and the checkpoint holds the optimizer and dropout RNG states. Devices and
precision: runtime.py.
"""

import dataclasses
import json
import math
import resource
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback
from dvclive.utils import standardize_metric_name

from resnet_cifar.augment import alternating_flip, augment
from resnet_cifar.checkpoint import Checkpoint, TrainingState, fingerprint, load_checkpoint, save_model
from resnet_cifar.models import build_model
from resnet_cifar.params import NETWORK, VariantSpec, load_params, variant_spec
from resnet_cifar.paths import checkpoint_dir, live_dir, model_path, summary_path, timing_path
from resnet_cifar.prepare import load_prepared
from resnet_cifar.runtime import (POLICIES, distribution, quiet_graph_optimizer, replicas, resolve_precision,
                                  run_record, seed_everything, use_devices)
from resnet_cifar.stage import StageError, all_or_nothing, atomic_path, run

NESTEROV_MOMENTUM = 0.9  # optimizer `nesterov`: SGD with this Nesterov momentum (He et al., Page)


def split_validation(data: dict, validation: str | float, seed: int):
    """(x_fit, y_fit), (x_val, y_val): the test set as the assignment, or a held-out fraction."""
    if validation == "test":
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
    order = np.random.default_rng(seed).permutation(len(data["x_train"]))
    n_val = max(1, round(validation * len(order)))
    fit, val = order[n_val:], order[:n_val]
    return (data["x_train"][fit], data["y_train"][fit]), (data["x_train"][val], data["y_train"][val])


def shuffled_batches(x: np.ndarray, y: np.ndarray, spec: VariantSpec, first_epoch: int) -> tf.data.Dataset:
    """The batches of epochs first_epoch..spec.epochs-1, augmented as the spec says. Each epoch's
    order and augmentation are set by (seed, epoch) alone, so that a resumed run sees exactly
    the batches an uninterrupted one would."""
    images, labels = tf.constant(x), tf.constant(y)
    augmented = spec.flip or spec.translate or spec.crop or spec.mixup
    # alternating flips: the images mirrored in even epochs, drawn once for the run
    first_half = tf.random.stateless_uniform([len(x)], tf.constant([spec.seed, -1], tf.int64)) < 0.5

    def batch_of(epoch, epoch_seed, step, batch):
        batch_images = tf.gather(images, batch)
        if spec.flip == "alternate":
            batch_images = alternating_flip(batch_images, tf.gather(first_half, batch), epoch)
        return augment(batch_images, tf.gather(labels, batch), spec.flip is True, spec.translate, spec.crop,
                       spec.mixup, tf.random.experimental.stateless_fold_in(epoch_seed, step))

    def epoch_batches(epoch):
        epoch_seed = tf.stack([tf.constant(spec.seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(len(x)), seed=epoch_seed)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(spec.batch_size)
        if not augmented:
            return batches.map(lambda batch: (tf.gather(images, batch), tf.gather(labels, batch)))
        return batches.enumerate().map(lambda step, batch: batch_of(epoch, epoch_seed, step, batch))

    batches = tf.data.Dataset.range(first_epoch, spec.epochs).flat_map(epoch_batches)
    return batches.prefetch(tf.data.AUTOTUNE)


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch with the metrics, seconds per epoch and the time left."""

    def __init__(self, variant: str, epochs: int, epoch_seconds: list[float]):
        super().__init__()
        self.variant, self.epochs, self.epoch_seconds = variant, epochs, epoch_seconds

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


@keras.saving.register_keras_serializable(package="resnet_cifar")
class WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then constant, cosine or linear
    decay to 0 at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str):
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = step / max(self.warmup_steps, 1)
        progress = tf.clip_by_value((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1)
        after = {"constant": tf.constant(1.0), "cosine": 0.5 * (1 + tf.cos(math.pi * progress)),
                 "linear": 1 - progress}[self.decay]
        return self.peak * tf.where(step < self.warmup_steps, warmup, after)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "decay": self.decay}


def learning_rate(spec: VariantSpec, steps_per_epoch: int) -> float | WarmupThenDecay:
    """The constant rate, or linear warm-up from 0 to it, then constant, cosine or linear decay to 0."""
    if spec.schedule == "constant" and not spec.warmup_epochs:
        return spec.learning_rate
    return WarmupThenDecay(spec.learning_rate, spec.warmup_epochs * steps_per_epoch,
                           spec.epochs * steps_per_epoch, spec.schedule)


@keras.saving.register_keras_serializable(package="resnet_cifar")
class SGD(keras.optimizers.SGD):
    """Keras's SGD, whose steps for the weights at `boosted_paths` (the norm layers' offsets and
    scales) are `factor` times larger (airbench's 64: batch norm's offsets learn slowly otherwise);
    their weight decay stays the other weights'."""

    def __init__(self, factor: float = 1.0, boosted_paths: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.factor, self.boosted_paths = factor, tuple(boosted_paths)

    def build(self, variables):
        super().build(variables)
        self.boosted = [variable.path in self.boosted_paths for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self.boosted[self._get_variable_index(variable)]:
            learning_rate = learning_rate * self.factor
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return super().get_config() | {"factor": self.factor, "boosted_paths": list(self.boosted_paths)}


def norm_weight_paths(model: keras.Model) -> tuple[str, ...]:
    """The paths of the trainable weights of the model's normalization layers."""
    norms = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
    return tuple(weight.path for layer in model.layers if isinstance(layer, norms) for weight in layer.trainable_weights)


def optimizer(spec: VariantSpec, steps_per_epoch: int, norm_paths: tuple[str, ...] = ()) -> keras.optimizers.Optimizer:
    """The variant's optimizer; weight decay is decoupled (Keras's), EMA is Keras's weight average.
    SGD's steps for the weights at `norm_paths` are norm_lr_factor times larger."""
    common = {"learning_rate": learning_rate(spec, steps_per_epoch), "weight_decay": spec.weight_decay or None}
    if spec.ema:  # the model ends training with the averaged weights
        common |= {"use_ema": True, "ema_momentum": spec.ema}
    if spec.optimizer == "adamw":
        return keras.optimizers.AdamW(**common)
    if spec.optimizer == "adam":
        return keras.optimizers.Adam(**common)
    if spec.optimizer == "lion":  # Chen et al. 2023: the sign of a momentum; Bachmann et al.'s MLPs train with it
        return keras.optimizers.Lion(**common)
    if spec.optimizer == "nesterov":
        return SGD(spec.norm_lr_factor, norm_paths, momentum=NESTEROV_MOMENTUM, nesterov=True, **common)
    return SGD(spec.norm_lr_factor, norm_paths, **common)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the training images (float64 sums, for exactness)."""
    return images.mean(axis=(0, 1, 2), dtype=np.float64), images.var(axis=(0, 1, 2), dtype=np.float64)


def compiled_model(spec: VariantSpec, x_fit: np.ndarray, num_classes: int, steps_per_epoch: int) -> keras.Model:
    """The variant's network, compiled to run a whole epoch per call (no Python between steps);
    under several replicas, one step per call (Keras 3 fails otherwise: keras-team/keras#19246).
    Call it in the scope of the strategy that trains it."""
    keras.mixed_precision.set_global_policy(POLICIES[spec.precision])
    model = build_model(num_classes=num_classes, input_shape=x_fit.shape[1:], name=spec.name,
                        input_stats=channel_stats(x_fit) if spec.standardize else None, training_images=x_fit,
                        **spec.group(NETWORK))
    model.compile(
        optimizer=optimizer(spec, steps_per_epoch, norm_weight_paths(model)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=steps_per_epoch if tf.distribute.get_strategy().num_replicas_in_sync == 1 else 1,
    )
    return model


def replay(live: Live, history: list[dict]) -> None:
    """Log the epochs done before an interruption again, as DVCLiveCallback logged them."""
    for logs in history:
        for name, value in logs.items():
            live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
        live.next_step()


def train(spec: VariantSpec, data: dict) -> None:
    """Fit the variant, resuming an interrupted run, and write its model, summary and history."""
    capabilities = use_devices(spec.devices)
    spec = dataclasses.replace(spec, precision=resolve_precision(spec.precision, gpu_capabilities=capabilities))
    devices = replicas()
    record = run_record(spec.precision)
    print(f"[{spec.name}] training in {spec.precision} on {', '.join(devices) or record['device']}, "
          f"Keras {record['keras']} on {record['backend']} {record[record['backend']]}")
    seed_everything(spec.seed)
    quiet_graph_optimizer()
    (x_fit, y_fit), validation_data = split_validation(data, spec.validation, spec.seed)
    checkpoints = checkpoint_dir(spec.name)
    expected = fingerprint(spec, [x_fit, y_fit, *validation_data])
    steps_per_epoch = math.ceil(len(x_fit) / spec.batch_size)
    strategy = distribution(devices)
    with strategy.scope():
        model = compiled_model(spec, x_fit, y_fit.shape[1], steps_per_epoch)
        # Summarized before any training, so that a resumed run's summary is the same.
        summary_lines: list[str] = []
        model.summary(print_fn=lambda line, **_: summary_lines.append(line))
        print("\n".join(summary_lines))
        state = TrainingState(expected)
        resumed = load_checkpoint(checkpoints, expected)
    if resumed:
        model, state = resumed
        print(f"[{spec.name}] resuming after epoch {len(state.history)} from {checkpoints}/")

    first_epoch = len(state.history)
    # A diverged or interrupted run must not leave a history that looks like a result;
    # its checkpoint stays for the next run to resume from.
    outputs = (live_dir(spec.name), model_path(spec.name), timing_path(spec.name), summary_path(spec.name))
    with all_or_nothing(*outputs):
        with Live(str(live_dir(spec.name)), dvcyaml=None, save_dvc_exp=False) as live:
            live.summary["parameters"] = model.count_params()
            replay(live, state.history)
            model.fit(shuffled_batches(x_fit, y_fit, spec, first_epoch),
                      steps_per_epoch=steps_per_epoch, epochs=spec.epochs, initial_epoch=first_epoch,
                      shuffle=False, validation_data=validation_data, verbose=0,
                      callbacks=[StopOnDivergence(spec.name), DVCLiveCallback(live=live),
                                 EpochProgress(spec.name, spec.epochs, state.epoch_seconds),
                                 Checkpoint(checkpoints, state)])
        save_model(model, model_path(spec.name))
        # What depends on the machine stays out of DVCLive's metrics.json.
        timing = {"train_seconds": round(sum(state.epoch_seconds), 1),
                  "seconds_per_epoch": round(float(np.median(state.epoch_seconds)), 2),
                  "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "ran_on": record}
        with atomic_path(timing_path(spec.name)) as tmp:
            tmp.write_text(json.dumps(timing, indent=2) + "\n")
        with atomic_path(summary_path(spec.name)) as tmp:
            tmp.write_text("\n".join(summary_lines) + "\n")
    shutil.rmtree(checkpoints)
    print(f"wrote {model_path(spec.name)} ({model.count_params():,} parameters)")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise StageError("usage: python -m resnet_cifar.train <variant>")
    spec = variant_spec(load_params(), argv[0])
    train(spec, load_prepared())


if __name__ == "__main__":
    run(main)
