"""Random changes to training batches: flips (random or alternating), translations, crops and mixup.

Every random draw is stateless, from a seed that `train` derives from (params seed, epoch,
batch), so a resumed run augments exactly as an uninterrupted one would.
"""

import tensorflow as tf


def mirror(images: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """The images with those where `mask` (one bool per image) is true mirrored left-right."""
    return tf.where(mask[:, None, None, None], tf.reverse(images, axis=[2]), images)


def flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirror each image left-right with probability 1/2."""
    return mirror(images, tf.random.stateless_uniform([tf.shape(images)[0]], seed) < 0.5)


def alternating_flip(images: tf.Tensor, first_half: tf.Tensor, epoch: tf.Tensor) -> tf.Tensor:
    """Mirror a random half of the training images in even epochs and the other half in odd ones,
    so that every image is seen both ways in any two epochs in a row (airbench's alternating flip).
    `first_half` says, for each image of the batch, whether it is in the half mirrored first."""
    return mirror(images, tf.not_equal(first_half, epoch % 2 == 1))


def translate(images: tf.Tensor, pixels: int, seed: tf.Tensor, fill: str = "CONSTANT") -> tf.Tensor:
    """Shift each image by up to `pixels` rows and columns either way: a random crop of the
    image padded by `pixels`, with zeros ("CONSTANT") or its own mirror image ("REFLECT")."""
    count, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pixels, pixels], [pixels, pixels], [0, 0]], mode=fill)
    offsets = tf.random.stateless_uniform([2, count], seed, 0, 2 * pixels + 1, dtype=tf.int32)
    rows = offsets[0][:, None] + tf.range(height)[None, :]
    columns = offsets[1][:, None] + tf.range(width)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, columns, axis=2, batch_dims=1)


def mixup(images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor):
    """Blend the batch with a shuffled copy of itself, images and labels alike, by a weight
    drawn from Beta(alpha, alpha) (as the ratio of two Gamma(alpha) draws)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    gammas = tf.random.stateless_gamma([2], seeds[0], alpha=alpha)
    weight = gammas[0] / (gammas[0] + gammas[1])
    partners = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(images)[0]), seeds[1])
    return (weight * images + (1 - weight) * tf.gather(images, partners),
            weight * labels + (1 - weight) * tf.gather(labels, partners))


def augment(images: tf.Tensor, labels: tf.Tensor, flips: bool, pixels: int, crop_pixels: int,
            alpha: float, seed: tf.Tensor):
    """The batch with the augmentations that are on (flips, translations, reflect-padded crops,
    mixup) applied."""
    flip_seed, translate_seed, mixup_seed, crop_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    if flips:
        images = flip(images, flip_seed)
    if pixels:
        images = translate(images, pixels, translate_seed)
    if crop_pixels:
        images = translate(images, crop_pixels, crop_seed, fill="REFLECT")
    if alpha:
        images, labels = mixup(images, labels, alpha, mixup_seed)
    return images, labels
