"""Random changes to training batches: flips (random or alternating), translations, crops and
mixup, in NumPy, so that every Keras backend trains on the same batches.

Flips, translations and crops only move pixels. Each is recorded in a `Views` of the batch (for
every output row and column, the source row and column it shows), so that the batch is gathered
from the training images in one pass whatever augmentations are on, and equals, exactly, the
images moved one augmentation after the other. Every random draw comes from a generator that
`batches` seeds with (params seed, epoch, step), so a resumed run augments exactly as an
uninterrupted one would.
"""

import numpy as np


class Views:
    """Where each pixel of each image of a batch comes from: `rows[i, r]` and `columns[i, c]` are
    the source row and column of output pixel (r, c) of image i; outside the source (a zero-filled
    translation) the output is zero."""

    def __init__(self, count: int, height: int, width: int):
        self.rows = np.tile(np.arange(height), (count, 1))
        self.columns = np.tile(np.arange(width), (count, 1))
        self.rows_inside = np.ones((count, height), bool)
        self.columns_inside = np.ones((count, width), bool)

    def mirror(self, mask: np.ndarray) -> None:
        """Mirror left-right the images where `mask` (one bool per image) is true."""
        self.columns = np.where(mask[:, None], self.columns[:, ::-1], self.columns)
        self.columns_inside = np.where(mask[:, None], self.columns_inside[:, ::-1], self.columns_inside)

    def shift(self, pixels: int, rng: np.random.Generator, reflect: bool) -> None:
        """Move each image by up to `pixels` rows and columns either way: a random window of the
        image padded by `pixels`, with zeros, or with its own mirror image (`reflect`, edge pixels
        not repeated)."""
        shifts = rng.integers(-pixels, pixels + 1, size=(2, len(self.rows)))
        self.rows, self.rows_inside = shifted(self.rows, self.rows_inside, shifts[0], reflect)
        self.columns, self.columns_inside = shifted(self.columns, self.columns_inside, shifts[1], reflect)

    def gather(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The views of images[indices] (a pixel at a time: ask only when some pixel moved)."""
        views = images[indices[:, None, None], self.rows[:, :, None], self.columns[:, None, :]]
        inside = self.rows_inside[:, :, None] & self.columns_inside[:, None, :]
        return views if inside.all() else views * inside[..., None].astype(views.dtype)


def shifted(sources: np.ndarray, inside: np.ndarray, shifts: np.ndarray, reflect: bool):
    """The sources and insideness of each line of pixels moved by `shifts` (one per image):
    output position p shows input position p + shift, mirrored back in at the edges with `reflect`,
    else outside (zero) beyond them."""
    size = sources.shape[1]
    positions = shifts[:, None] + np.arange(size)
    if reflect:
        positions = np.abs(positions)
        positions = np.where(positions > size - 1, 2 * (size - 1) - positions, positions)
        return np.take_along_axis(sources, positions, 1), np.take_along_axis(inside, positions, 1)
    within = (positions >= 0) & (positions < size)
    positions = np.clip(positions, 0, size - 1)
    return np.take_along_axis(sources, positions, 1), np.take_along_axis(inside, positions, 1) & within


def mixup(images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator):
    """Blend the batch with a shuffled copy of itself, images and labels alike, by one weight
    drawn from Beta(alpha, alpha)."""
    weight = np.float32(rng.beta(alpha, alpha))
    partners = rng.permutation(len(images))
    return (weight * images + (1 - weight) * images[partners],
            weight * labels + (1 - weight) * labels[partners])
