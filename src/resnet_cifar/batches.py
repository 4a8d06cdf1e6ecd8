"""The train stage's batches, the same on every Keras backend: the validation split, each epoch's
order and each batch's augmentation are drawn with NumPy from the params seed, the epoch and the
step alone, so that a resumed run sees exactly the batches an uninterrupted one would.
"""

import math

import keras
import numpy as np

from resnet_cifar.augment import Views, mixup
from resnet_cifar.params import VariantSpec

# The random streams of training, each seeded with (params seed, stream, and the epoch and step
# where it has them).
ORDER, ALTERNATION, FLIPS, TRANSLATIONS, CROPS, MIXUP = range(1, 7)


def random_stream(seed: int, stream: int, *position: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *position])


def split_validation(data: dict, validation: str | float, seed: int):
    """(x_fit, y_fit), (x_val, y_val): the test set as the assignment, or a held-out fraction."""
    if validation == "test":
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
    order = np.random.default_rng(seed).permutation(len(data["x_train"]))
    n_val = max(1, round(validation * len(order)))
    fit, val = order[n_val:], order[:n_val]
    return (data["x_train"][fit], data["y_train"][fit]), (data["x_train"][val], data["y_train"][val])


class TrainingBatches(keras.utils.PyDataset):
    """The batches of epochs first_epoch .. spec.epochs - 1 as one sequence, which `fit` reads on
    from epoch to epoch: batch i is step i % steps_per_epoch of epoch first_epoch + i // steps_per_epoch,
    augmented as the spec says. Process `process` of a job of `processes` gets its share of each
    batch: its slice of the rows, in process order."""

    def __init__(self, x: np.ndarray, y: np.ndarray, spec: VariantSpec, first_epoch: int,
                 process: int = 0, processes: int = 1):
        super().__init__()
        self.x, self.y, self.spec, self.first_epoch = x, y, spec, first_epoch
        self.process, self.processes = process, processes
        self.steps_per_epoch = math.ceil(len(x) / spec.batch_size)
        # Alternating flips: the images mirrored in even epochs (the others in odd ones), drawn once.
        self.mirrored_in_even_epochs = random_stream(spec.seed, ALTERNATION).random(len(x)) < 0.5
        self.epoch_order = (None, None)  # the last epoch's order, drawn once

    @property
    def num_batches(self) -> int:
        return self.steps_per_epoch * (self.spec.epochs - self.first_epoch)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, step = divmod(index, self.steps_per_epoch)
        epoch += self.first_epoch
        drawn_for, order = self.epoch_order
        if drawn_for != epoch:
            order = random_stream(self.spec.seed, ORDER, epoch).permutation(len(self.x))
            self.epoch_order = (epoch, order)  # one assignment: safe to read from another thread
        indices = order[step * self.spec.batch_size:(step + 1) * self.spec.batch_size]
        images, labels = self.batch(indices, epoch, step)
        # The whole batch is drawn in every process (mixup pairs images across all of it).
        share = slice(len(indices) * self.process // self.processes, len(indices) * (self.process + 1) // self.processes)
        return images[share], labels[share]

    def batch(self, indices: np.ndarray, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels at `indices`, augmented with the draws of (epoch, step)."""
        spec = self.spec
        if not (spec.flip or spec.translate or spec.crop):
            images = self.x[indices]
        else:
            views = Views(len(indices), *self.x.shape[1:3])
            if spec.flip == "alternate":
                views.mirror(self.mirrored_in_even_epochs[indices] != (epoch % 2 == 1))
            elif spec.flip:
                views.mirror(random_stream(spec.seed, FLIPS, epoch, step).random(len(indices)) < 0.5)
            if spec.translate:
                views.shift(spec.translate, random_stream(spec.seed, TRANSLATIONS, epoch, step), reflect=False)
            if spec.crop:
                views.shift(spec.crop, random_stream(spec.seed, CROPS, epoch, step), reflect=True)
            images = views.gather(self.x, indices)
        labels = self.y[indices]
        if spec.mixup:
            images, labels = mixup(images, labels, spec.mixup, random_stream(spec.seed, MIXUP, epoch, step))
        return images, labels
