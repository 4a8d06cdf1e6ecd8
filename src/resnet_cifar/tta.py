"""Test-time augmentation: a prediction averaged over views of each image (the evaluate stage's on
the test set, the train stage's on a held-out validation split)."""

import keras
import numpy as np

BATCH_SIZE = 1024  # images per predicting step: memory, not results, depends on it


def predict(model: keras.Model, images: np.ndarray, tta: bool | str, callbacks: tuple = ()) -> np.ndarray:
    """Class probabilities; with `tta` true, the mean of those of the image and its mirror image;
    with "shifts", half that mean and half the same mean for the image shifted by one pixel
    diagonally either way (mirror-padded): airbench's six views. `callbacks` see every batch."""
    def view(images: np.ndarray) -> np.ndarray:
        return model.predict(images, batch_size=BATCH_SIZE, verbose=0, callbacks=list(callbacks))

    probabilities = view(images)
    if not tta:
        return probabilities
    probabilities = (probabilities + view(images[:, :, ::-1])) / 2
    if tta != "shifts":
        return probabilities
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    shifted = [padded[:, :height, :width], padded[:, 2:, 2:]]
    return (probabilities + sum(predict(model, view, True, callbacks) for view in shifted) / 2) / 2


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of images whose most probable class is the one-hot label's."""
    return float(np.mean(np.argmax(probabilities, axis=1) == np.argmax(labels, axis=1)))
