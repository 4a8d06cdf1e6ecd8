import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY_PARAMS
from resnet_cifar import augment, train
from resnet_cifar.params import variant_spec

SEED = tf.constant([3, 7], tf.int64)


def random_images(count: int = 64, size: int = 8) -> np.ndarray:
    # Strictly positive and all distinct, so zero padding and each shift are recognizable.
    return np.random.default_rng(0).uniform(0.1, 1.0, (count, size, size, 3)).astype(np.float32)


def shifted(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The image moved down by `rows` and right by `columns`, zero-filled."""
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    out[max(rows, 0):height + min(rows, 0), max(columns, 0):width + min(columns, 0)] = \
        image[max(-rows, 0):height - max(rows, 0), max(-columns, 0):width - max(columns, 0)]
    return out


def test_flip_mirrors_about_half_of_the_images_and_leaves_the_rest():
    images = random_images(400)
    flipped = augment.flip(tf.constant(images), SEED).numpy()
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images)]
    unchanged = [np.array_equal(f, i) for f, i in zip(flipped, images)]
    assert all(m != u for m, u in zip(mirrored, unchanged))
    assert 150 < sum(mirrored) < 250


def test_translate_shifts_each_image_by_at_most_the_given_pixels():
    images = random_images()
    moved = augment.translate(tf.constant(images), 2, SEED).numpy()
    shifts = []
    for out, image in zip(moved, images):
        (match,) = [(r, c) for r in range(-2, 3) for c in range(-2, 3) if np.array_equal(out, shifted(image, r, c))]
        shifts.append(match)
    assert len(set(shifts)) > 15  # each image draws its own shift; 25 are possible


def reflected_crop(image: np.ndarray, pixels: int, row: int, column: int) -> np.ndarray:
    """The window at (row, column) of the image padded by `pixels` with its own mirror image."""
    height, width = image.shape[:2]
    padded = np.pad(image, [(pixels, pixels), (pixels, pixels), (0, 0)], mode="reflect")
    return padded[row:row + height, column:column + width]


def test_crop_takes_a_window_of_the_reflect_padded_image():
    images = random_images()
    cropped = augment.translate(tf.constant(images), 3, SEED, fill="REFLECT").numpy()
    offsets = []
    for out, image in zip(cropped, images):
        (match,) = [(r, c) for r in range(7) for c in range(7) if np.array_equal(out, reflected_crop(image, 3, r, c))]
        offsets.append(match)
        # Every pixel is one of the image's own: no zeros, nothing outside its range.
        assert np.isin(out, image).all()
    assert len(set(offsets)) > 20  # each image draws its own window; 49 are possible
    again = augment.translate(tf.constant(images), 3, SEED, fill="REFLECT").numpy()
    other = augment.translate(tf.constant(images), 3, SEED + 1, fill="REFLECT").numpy()
    np.testing.assert_array_equal(cropped, again)  # a function of the seed
    assert not np.array_equal(cropped, other)


def test_mixup_blends_images_and_labels_by_the_same_weight():
    images = random_images(32)
    labels = np.eye(32, dtype=np.float32)  # one class per image: each blend's partner can be read off
    mixed_images, mixed_labels = (t.numpy() for t in augment.mixup(tf.constant(images), tf.constant(labels),
                                                                   0.4, SEED))
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1, rtol=1e-6)
    weight = mixed_labels[0, 0]
    assert 0 < weight < 1
    partners = []
    for i in range(32):
        partner = int(np.argmax(np.where(np.arange(32) == i, -1, mixed_labels[i])))
        partners.append(partner)
        assert mixed_labels[i, i] == pytest.approx(weight) and mixed_labels[i, partner] == pytest.approx(1 - weight)
        np.testing.assert_allclose(mixed_images[i], weight * images[i] + (1 - weight) * images[partner], atol=1e-6)
    assert sorted(partners) == list(range(32))  # the batch blended with a shuffled copy of itself


def test_label_smoothing_smooths_mixed_labels_as_it_would_each_partner():
    # The train stage's loss on a mixed batch is the mixup weight's blend of the label-smoothed
    # losses against each partner's label (Bachmann et al. train with both: mixup 0.8, smoothing 0.3).
    params = {**TINY_PARAMS, "variants": {"v": {"widths": [4], "mixup": 0.8, "label_smoothing": 0.3,
                                                "precision": "float32"}}}
    images, labels = random_images(16), np.eye(16, dtype=np.float32)
    model = train.compiled_model(variant_spec(params, "v"), images, num_classes=16, steps_per_epoch=1)
    mixed_images, mixed_labels = (t.numpy() for t in augment.mixup(tf.constant(images), tf.constant(labels), 0.8, SEED))
    weight = mixed_labels[0, 0]
    partners = np.argmax(np.where(labels == 1, -1, mixed_labels), axis=1)
    probabilities = model(mixed_images)
    per_image = keras.losses.CategoricalCrossentropy(label_smoothing=0.3, reduction=None)
    blended = weight * per_image(labels, probabilities) + (1 - weight) * per_image(labels[partners], probabilities)
    assert 0.05 < weight < 0.95
    np.testing.assert_allclose(model.loss(mixed_labels, probabilities), np.mean(blended), rtol=1e-5)


def test_augmentation_is_a_function_of_the_seed():
    images, labels = tf.constant(random_images(16)), tf.constant(np.eye(16, dtype=np.float32))
    first = augment.augment(images, labels, True, 2, 3, 0.4, SEED)
    again = augment.augment(images, labels, True, 2, 3, 0.4, SEED)
    other = augment.augment(images, labels, True, 2, 3, 0.4, SEED + 1)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


@pytest.mark.parametrize("augmented", [False, True])
def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(augmented):
    params = {**TINY_PARAMS, "variants": {"v": {"widths": [4], "epochs": 3, "batch_size": 8}}}
    if augmented:
        params["variants"]["v"] |= {"flip": True, "translate": 2, "crop": 2, "mixup": 0.4}
    spec = variant_spec(params, "v")
    x, y = random_images(20), np.eye(20, dtype=np.float32)
    from_start = [[t.numpy() for t in batch] for batch in train.shuffled_batches(x, y, spec, first_epoch=0)]
    resumed = [[t.numpy() for t in batch] for batch in train.shuffled_batches(x, y, spec, first_epoch=1)]
    assert len(from_start) == 9 and len(resumed) == 6  # ceil(20 / 8) batches per epoch
    for (x_a, y_a), (x_b, y_b) in zip(from_start[3:], resumed):
        np.testing.assert_array_equal(x_a, x_b)
        np.testing.assert_array_equal(y_a, y_b)
    epoch_images = np.concatenate([b[0] for b in from_start[:3]])
    assert not np.array_equal(np.concatenate([b[0] for b in from_start[3:6]]), epoch_images)
    if not augmented:  # each epoch holds every image once
        np.testing.assert_array_equal(np.sort(epoch_images.reshape(20, -1), axis=0), np.sort(x.reshape(20, -1), axis=0))


def test_every_epoch_has_its_own_batch_order():
    # Keras's model.fit(x, y, shuffle=True) replays one order in every epoch once
    # keras.utils.set_random_seed has been called (Keras 3.15, TensorFlow 2.21), which the train
    # stage does: the stage must reshuffle by (seed, epoch) itself, as the assignment's unseeded
    # notebook did.
    params = {**TINY_PARAMS, "variants": {"v": {"widths": [4], "epochs": 4, "batch_size": 5}}}
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
    batches = [b[0].numpy().ravel() for b in train.shuffled_batches(x, np.eye(20, dtype=np.float32),
                                                                    variant_spec(params, "v"), first_epoch=0)]
    orders = [tuple(np.concatenate(batches[epoch * 4:(epoch + 1) * 4])) for epoch in range(4)]
    assert all(sorted(order) == list(range(20)) for order in orders)  # each epoch sees every image once
    assert len(set(orders)) == 4


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    # Through the train stage's batches: each image (told apart by its label) is mirrored in
    # exactly one of any two epochs in a row, about half of them in the first.
    params = {**TINY_PARAMS, "variants": {"v": {"widths": [4], "epochs": 3, "batch_size": 16, "flip": "alternate"}}}
    x, y = random_images(200), np.eye(200, dtype=np.float32)
    batches = list(train.shuffled_batches(x, y, variant_spec(params, "v"), first_epoch=0))
    per_epoch = len(batches) // 3
    mirrored_by_epoch = []
    for epoch in range(3):
        mirrored = np.zeros(200, bool)
        for images, labels in batches[epoch * per_epoch:(epoch + 1) * per_epoch]:
            for image, index in zip(images.numpy(), np.argmax(labels.numpy(), axis=1)):
                assert np.array_equal(image, x[index][:, ::-1]) or np.array_equal(image, x[index])
                mirrored[index] = np.array_equal(image, x[index][:, ::-1])
        mirrored_by_epoch.append(mirrored)
    assert 70 < mirrored_by_epoch[0].sum() < 130
    np.testing.assert_array_equal(mirrored_by_epoch[1], ~mirrored_by_epoch[0])
    np.testing.assert_array_equal(mirrored_by_epoch[2], mirrored_by_epoch[0])
