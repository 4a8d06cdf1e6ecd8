"""The boundaries between calls into the backend, in training and prediction: where a stop request
takes effect (stage.py) and where the running pass shows how far it is. A call lasts about a second
in training (runtime.steps_per_call) and one batch in prediction."""

import sys
import time

import keras

from resnet_cifar.stage import check_interrupt

LOG_EVERY_SECONDS = 30.0  # a plain progress line in a log, or under `dvc repro`
REDRAW_EVERY_SECONDS = 0.5  # a terminal's progress line, redrawn in place


class Boundaries(keras.callbacks.Callback):
    """After each call into the backend, act on a stop request; then show the running pass's step,
    images per second and time left: redrawn in place on a terminal, a line every 30 s elsewhere."""

    def __init__(self, name: str, batch_size: int, out=sys.stdout):
        super().__init__()
        self.name, self.batch_size, self.out = name, batch_size, out
        self.terminal = out.isatty()

    def start(self, what: str) -> None:
        self.what, self.steps = what, self.params["steps"]  # Keras's: the batches of the pass
        self.started = self.shown = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.start(f"epoch {epoch + 1}/{self.params['epochs']}")

    def on_predict_begin(self, logs=None):
        self.start("predicting")

    def on_train_batch_end(self, batch, logs=None):
        self.boundary(batch + 1)

    def on_test_batch_end(self, batch, logs=None):
        check_interrupt()  # validation: part of the epoch the training line shows

    def on_predict_batch_end(self, batch, logs=None):
        self.boundary(batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.clear()

    def on_predict_end(self, logs=None):
        self.clear()

    def boundary(self, steps_done: int) -> None:
        check_interrupt()
        now = time.perf_counter()
        if now - self.shown < (REDRAW_EVERY_SECONDS if self.terminal else LOG_EVERY_SECONDS):
            return
        self.shown = now
        steps_done = min(steps_done, self.steps)  # a call of several steps may run past the last one
        elapsed = now - self.started
        line = (f"[{self.name}] {self.what}  step {steps_done}/{self.steps}  "
                f"{steps_done * self.batch_size / elapsed:.0f} images/s  "
                f"~{(self.steps - steps_done) * elapsed / steps_done:.0f} s left")
        self.out.write(f"\r{line}\x1b[K" if self.terminal else f"{line}\n")
        self.out.flush()

    def clear(self) -> None:
        """Make room for the next line on a terminal."""
        if self.terminal:
            self.out.write("\r\x1b[K")
            self.out.flush()
