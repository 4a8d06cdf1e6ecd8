"""Stage `train@<variant>`: build the variant's network, fit it, log every epoch with DVCLive.

    python -m resnet_cifar.train <variant>

Writes models/<variant>.keras, and under metrics/variants/<variant>/ the DVCLive history
(train/), the wall times (train_time.json) and the model summary (summary.txt). With a held-out
`validation` fraction and `tta`, the history's summary adds eval/accuracy_tta: the final model's
accuracy on that split with the test-time augmentation the evaluate stage applies to the test set,
so that recipes are chosen on the numbers they will be judged by, without the test set.

Every epoch ends with a checkpoint (checkpoint.py). A run that was killed resumes from it, and ends
exactly as an uninterrupted run would: the batches of each epoch are shuffled and augmented by
(seed, epoch, step) alone (batches.py), and the checkpoint holds the optimizer and dropout RNG
states. The network: models.py; its optimizer: optimizers.py; the backend, devices and precision:
runtime.py.
"""

import contextlib
import dataclasses
import json
import math
import resource
import shutil
import time
from pathlib import Path

import keras
import numpy as np
from dvclive import Live
from dvclive.utils import standardize_metric_name

from resnet_cifar import tta
from resnet_cifar.batches import TrainingBatches, split_validation
from resnet_cifar.checkpoint import Checkpoint, TrainingState, fingerprint, load_checkpoint, save_model
from resnet_cifar.datasets import load_prepared
from resnet_cifar.models import Network, build_model
from resnet_cifar.optimizers import optimizer
from resnet_cifar.params import VariantSpec, backend, load_params, variant_spec
from resnet_cifar.paths import checkpoint_dir, live_dir, live_outputs, model_path, summary_path, timing_path
from resnet_cifar.progress import Boundaries
from resnet_cifar.runtime import (Devices, check_backend, check_even_split, distribution, join_processes,
                                  precision_policy, quiet_graph_optimizer, resolve_precision, resolve_xla, run_record,
                                  seed_everything, steps_per_call, synchronized_norm, use_devices)
from resnet_cifar.stage import (StageError, all_or_nothing, atomic_path, check_interrupt, interrupts_at_boundaries,
                                run)


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


class LiveMetrics(keras.callbacks.Callback):
    """Each epoch's metrics to DVCLive, under the names DVCLive's own Keras callback gives them
    (train/accuracy, eval/loss, ...), without the TensorFlow that callback imports."""

    def __init__(self, live: Live):
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
        self.live.next_step()


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


def compiled_model(spec: VariantSpec, x_fit: np.ndarray, num_classes: int, steps_per_epoch: int,
                   replicas: int = 1) -> keras.Model:
    """The variant's network, compiled to train on `replicas` devices. Call it in the scope of
    their distribution and of the variant's precision (runtime.precision_policy)."""
    model = build_model(Network.of(spec), num_classes, x_fit, spec.name, synchronized_norm(replicas))
    model.compile(
        optimizer=optimizer(spec, steps_per_epoch, model),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing),
        metrics=["accuracy"],
        jit_compile=spec.xla,
    )
    return model


def pace(model: keras.Model, steps: int) -> None:
    """Run `steps` training (and validation) steps per call into the backend; the same numbers
    come out whatever the pace (tests/test_progress.py)."""
    if model.steps_per_execution != steps:
        model.steps_per_execution = steps
        model.make_train_function(force=True)
        model.make_test_function(force=True)


def replay(live: Live, history: list[dict]) -> None:
    """Log the epochs done before an interruption again, as they were logged then."""
    logger = LiveMetrics(live)
    for epoch, logs in enumerate(history):
        logger.on_epoch_end(epoch, logs)


def resolved(spec: VariantSpec, chosen: Devices) -> VariantSpec:
    """The spec with its `auto` precision and XLA resolved for the `chosen` devices."""
    precision = resolve_precision(spec.precision, gpu_capabilities=chosen.capabilities())
    return dataclasses.replace(spec, precision=precision,
                               xla=resolve_xla(spec.xla, spec.arch, precision,
                                               on_one_cpu=not chosen.gpus and len(chosen.replicas()) <= 1))


def on_this_machine(spec: VariantSpec) -> tuple[VariantSpec, list[str], dict]:
    """The spec with its precision resolved, the devices to train on (as the distribution names
    them) and the record of what runs: pick the devices, seed every generator, quiet TensorFlow's
    graph optimizer."""
    chosen = use_devices(spec.devices)
    spec = resolved(spec, chosen)
    devices = chosen.replicas()
    record = run_record(spec.precision, chosen)
    print(f"[{spec.name}] training in {spec.precision} on {', '.join(devices) or record['device']}, "
          f"Keras {record['keras']} on {record['backend']} {record[record['backend']]}")
    seed_everything(spec.seed, spec.xla)
    quiet_graph_optimizer()
    return spec, devices, record


def built_or_resumed(spec: VariantSpec, x_fit: np.ndarray, num_classes: int, steps_per_epoch: int,
                     replicas: int, expected: dict,
                     checkpoint: Path) -> tuple[keras.Model, TrainingState, list[str]]:
    """The compiled model and training state, from the checkpoint of an interrupted run of the same
    fingerprint if there is one, and the model's summary (made before any training, so that a
    resumed run's is the same)."""
    model = compiled_model(spec, x_fit, num_classes, steps_per_epoch, replicas)
    summary_lines: list[str] = []
    model.summary(print_fn=lambda line, **_: summary_lines.append(line))
    print("\n".join(summary_lines))
    resumed = load_checkpoint(checkpoint, expected)
    if not resumed:
        return model, TrainingState(expected), summary_lines
    model, state = resumed
    print(f"[{spec.name}] resuming after epoch {len(state.history)} from {checkpoint}/")
    return model, state, summary_lines


def step_seconds(model: keras.Model, batches: TrainingBatches) -> float:
    """About the seconds of one training step: three times a forward pass over the first batch
    (the backward pass takes about twice the forward's time), timed after the call that traces it.
    Predicting changes no weight and draws no random number."""
    images = batches[0][0]
    model.predict_on_batch(images)
    started = time.perf_counter()
    model.predict_on_batch(images)
    return 3 * (time.perf_counter() - started)


def fit(model: keras.Model, state: TrainingState, spec: VariantSpec, batches: TrainingBatches,
        validation_data: tuple, checkpoint: Path, replicas: int, logged: bool) -> None:
    """Train the epochs not yet in `state` on `replicas` devices, about a second per call into the
    backend (runtime.steps_per_call), checkpointing each epoch, and logging each with DVCLive
    where `logged` (process 0 of a job; the others train alongside it)."""
    # Timing, tracing and DVCLive's start-up are inside the block too: a stop request then waits
    # for check_interrupt instead of raising inside TensorFlow's tracing or DVCLive's files.
    with interrupts_at_boundaries(), (Live(str(live_dir(spec.name)), dvcyaml=None, save_dvc_exp=False) if logged
                                      else contextlib.nullcontext()) as live:
        pace(model, steps_per_call(batches.steps_per_epoch, lambda: step_seconds(model, batches), replicas))
        check_interrupt()
        callbacks = [StopOnDivergence(spec.name), Boundaries(spec.name, spec.batch_size)]
        if live:
            live.summary["parameters"] = model.count_params()
            replay(live, state.history)
            callbacks += [LiveMetrics(live), EpochProgress(spec.name, spec.epochs, state.epoch_seconds)]
        model.fit(batches, steps_per_epoch=batches.steps_per_epoch, epochs=spec.epochs,
                  initial_epoch=len(state.history), shuffle=False, validation_data=validation_data, verbose=0,
                  callbacks=[*callbacks, Checkpoint(checkpoint, state)])
        if live and spec.validation != "test" and spec.tta:
            x_val, y_val = validation_data
            probabilities = tta.predict(model, x_val, spec.tta, (Boundaries(spec.name, tta.BATCH_SIZE),))
            live.log_metric("eval/accuracy_tta", round(tta.accuracy(probabilities, y_val), 4), plot=False)


def write_results(model: keras.Model, state: TrainingState, spec: VariantSpec, summary_lines: list[str],
                  record: dict) -> None:
    """The model, the wall times with what ran (kept out of DVCLive's metrics.json: they depend on
    the machine) and the model summary."""
    save_model(model, model_path(spec.name))
    timing = {"train_seconds": round(sum(state.epoch_seconds), 1),
              "seconds_per_epoch": round(float(np.median(state.epoch_seconds)), 2),
              "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "ran_on": {**record, "xla": model.jit_compile}}
    with atomic_path(timing_path(spec.name)) as tmp:
        tmp.write_text(json.dumps(timing, indent=2) + "\n")
    with atomic_path(summary_path(spec.name)) as tmp:
        tmp.write_text("\n".join(summary_lines) + "\n")


def train(spec: VariantSpec, data: dict, process: int = 0, processes: int = 1) -> None:
    """Fit the variant, resuming an interrupted run, and write its model, summary and history
    (process 0 of a job of several processes writes them)."""
    spec, devices, record = on_this_machine(spec)
    (x_fit, y_fit), validation_data = split_validation(data, spec.validation, spec.seed)
    replicas = max(len(devices), 1)
    check_even_split(spec.name, spec.batch_size, len(x_fit), replicas)
    expected = fingerprint(spec, [x_fit, y_fit, *validation_data])
    steps_per_epoch = math.ceil(len(x_fit) / spec.batch_size)
    checkpoint = checkpoint_dir(spec.name, process)
    with distribution(devices), precision_policy(spec.precision):
        model, state, summary_lines = built_or_resumed(spec, x_fit, y_fit.shape[1], steps_per_epoch, replicas,
                                                       expected, checkpoint)
        batches = TrainingBatches(x_fit, y_fit, spec, len(state.history), process, processes)
        if process == 0:
            # A diverged or interrupted run must not leave a history that looks like a result;
            # its checkpoint stays for the next run to resume from.
            outputs = (*live_outputs(spec.name), model_path(spec.name), timing_path(spec.name), summary_path(spec.name))
            with all_or_nothing(*outputs):
                fit(model, state, spec, batches, validation_data, checkpoint, replicas, logged=True)
                write_results(model, state, spec, summary_lines, record)
        else:  # every process sees the whole validation split: the metrics are the same
            fit(model, state, spec, batches, validation_data, checkpoint, replicas, logged=False)
            # Saving a model creates variables, which the processes of a job create together.
            save_model(model, checkpoint / "model.keras")
    shutil.rmtree(checkpoint)
    if process == 0:
        print(f"wrote {model_path(spec.name)} ({model.count_params():,} parameters)")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise StageError("usage: python -m resnet_cifar.train <variant>")
    params = load_params()
    check_backend(backend(params))
    spec = variant_spec(params, argv[0])
    process, processes = join_processes()
    train(spec, load_prepared(), process, processes)


if __name__ == "__main__":
    run(main)
