import dataclasses

import keras
import numpy as np
import pytest

from support import TINY_PARAMS
from resnet_cifar import augment, train
from resnet_cifar.batches import TrainingBatches
from resnet_cifar.params import variant_spec

SEED = 37


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


def reflected_crop(image: np.ndarray, pixels: int, row: int, column: int) -> np.ndarray:
    """The window at (row, column) of the image padded by `pixels` with its own mirror image."""
    height, width = image.shape[:2]
    padded = np.pad(image, [(pixels, pixels), (pixels, pixels), (0, 0)], mode="reflect")
    return padded[row:row + height, column:column + width]


def views(images: np.ndarray) -> augment.Views:
    return augment.Views(len(images), *images.shape[1:3])


def test_mirror_flips_the_masked_images_left_right_and_leaves_the_rest():
    images = random_images(16)
    mask = np.arange(16) % 3 == 0
    flipped = views(images)
    flipped.mirror(mask)
    out = flipped.gather(images, np.arange(16))
    for image, result, mirrored in zip(images, out, mask):
        np.testing.assert_array_equal(result, image[:, ::-1] if mirrored else image)


def test_translate_shifts_each_image_by_at_most_the_given_pixels():
    images = random_images()
    moved = views(images)
    moved.shift(2, np.random.default_rng(SEED), reflect=False)
    shifts = []
    for out, image in zip(moved.gather(images, np.arange(len(images))), images):
        (match,) = [(r, c) for r in range(-2, 3) for c in range(-2, 3) if np.array_equal(out, shifted(image, r, c))]
        shifts.append(match)
    assert len(set(shifts)) > 15  # each image draws its own shift; 25 are possible


def cropped(images: np.ndarray, seed: int) -> np.ndarray:
    crops = views(images)
    crops.shift(3, np.random.default_rng(seed), reflect=True)
    return crops.gather(images, np.arange(len(images)))


def test_crop_takes_a_window_of_the_reflect_padded_image():
    images = random_images()
    crops = cropped(images, SEED)
    offsets = []
    for out, image in zip(crops, images):
        (match,) = [(r, c) for r in range(7) for c in range(7) if np.array_equal(out, reflected_crop(image, 3, r, c))]
        offsets.append(match)
        # Every pixel is one of the image's own: no zeros, nothing outside its range.
        assert np.isin(out, image).all()
    assert len(set(offsets)) > 20  # each image draws its own window; 49 are possible
    np.testing.assert_array_equal(crops, cropped(images, SEED))  # a function of the seed
    assert not np.array_equal(crops, cropped(images, SEED + 1))


def test_views_move_pixels_as_the_augmentations_would_one_after_the_other():
    # A flip, a reflect-padded crop, then a zero-filled translation, gathered in one pass from a
    # larger set of images, equal those three applied in turn to the batch's images.
    images, indices = random_images(40), np.arange(0, 40, 3)
    mask = np.arange(len(indices)) % 2 == 0
    composed = augment.Views(len(indices), 8, 8)
    composed.mirror(mask)
    composed.shift(3, np.random.default_rng(1), reflect=True)
    composed.shift(2, np.random.default_rng(2), reflect=False)
    crops = np.random.default_rng(1).integers(-3, 4, size=(2, len(indices)))
    shifts = np.random.default_rng(2).integers(-2, 3, size=(2, len(indices)))
    for i, (out, image) in enumerate(zip(composed.gather(images, indices), images[indices])):
        image = image[:, ::-1] if mask[i] else image
        image = reflected_crop(image, 3, crops[0, i] + 3, crops[1, i] + 3)
        np.testing.assert_array_equal(out, shifted(image, -shifts[0, i], -shifts[1, i]))


def partners_of(mixed_labels: np.ndarray) -> np.ndarray:
    """Each image's mixup partner, read off labels of one class per image: the other class in its
    mixed label, or itself (a permutation may leave an image in place)."""
    others = np.where(np.eye(len(mixed_labels), dtype=bool), 0, mixed_labels)
    return np.where(others.max(axis=1) > 0, np.argmax(others, axis=1), np.arange(len(mixed_labels)))


def test_mixup_blends_images_and_labels_by_the_same_weight():
    images = random_images(32)
    labels = np.eye(32, dtype=np.float32)  # one class per image: each blend's partner can be read off
    mixed_images, mixed_labels = augment.mixup(images, labels, 0.4, np.random.default_rng(SEED))
    assert mixed_images.dtype == np.float32
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1, rtol=1e-6)
    partners = partners_of(mixed_labels)
    mixed = np.argmax(partners != np.arange(32))  # an image with a partner other than itself
    weight = mixed_labels[mixed, mixed]
    assert 0 < weight < 1 and (partners != np.arange(32)).sum() > 20
    for i, partner in enumerate(partners):
        expected = np.zeros(32, np.float32)
        expected[i] += weight
        expected[partner] += 1 - weight
        np.testing.assert_allclose(mixed_labels[i], expected, rtol=1e-6)
        np.testing.assert_allclose(mixed_images[i], weight * images[i] + (1 - weight) * images[partner], atol=1e-6)
    assert sorted(partners) == list(range(32))  # the batch blended with a shuffled copy of itself


def test_label_smoothing_smooths_mixed_labels_as_it_would_each_partner():
    # The train stage's loss on a mixed batch is the mixup weight's blend of the label-smoothed
    # losses against each partner's label (Bachmann et al. train with both: mixup 0.8, smoothing 0.3).
    params = {**TINY_PARAMS, "variants": {"v": {"widths": [4], "mixup": 0.8, "label_smoothing": 0.3,
                                                "precision": "float32"}}}
    images, labels = random_images(16), np.eye(16, dtype=np.float32)
    model = train.compiled_model(variant_spec(params, "v"), images, num_classes=16, steps_per_epoch=1)
    mixed_images, mixed_labels = augment.mixup(images, labels, 0.8, np.random.default_rng(SEED))
    partners = partners_of(mixed_labels)
    mixed = np.argmax(partners != np.arange(16))  # an image with a partner other than itself
    weight = mixed_labels[mixed, mixed]
    probabilities = model(mixed_images)
    per_image = keras.losses.CategoricalCrossentropy(label_smoothing=0.3, reduction=None)
    blended = weight * per_image(labels, probabilities) + (1 - weight) * per_image(labels[partners], probabilities)
    assert 0.05 < weight < 0.95
    np.testing.assert_allclose(model.loss(mixed_labels, probabilities), np.mean(blended), rtol=1e-5)


def augmented_spec(epochs: int = 3, batch_size: int = 8, **keys):
    return variant_spec({**TINY_PARAMS, "variants": {"v": {"widths": [4], "epochs": epochs, "batch_size": batch_size,
                                                           **keys}}}, "v")


def test_a_batch_is_a_function_of_the_seed_epoch_and_step():
    spec = augmented_spec(flip=True, translate=2, crop=3, mixup=0.4)
    x, y = random_images(16), np.eye(16, dtype=np.float32)
    batches = TrainingBatches(x, y, spec, first_epoch=0)
    indices = np.arange(16)
    first = batches.batch(indices, epoch=1, step=0)
    for same in (batches.batch(indices, 1, 0), TrainingBatches(x, y, spec, first_epoch=0).batch(indices, 1, 0)):
        for a, b in zip(first, same):
            np.testing.assert_array_equal(a, b)
    other_seed = TrainingBatches(x, y, dataclasses.replace(spec, seed=spec.seed + 1), first_epoch=0)
    for other in (batches.batch(indices, 1, 1), batches.batch(indices, 2, 0), other_seed.batch(indices, 1, 0)):
        assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("augmented", [False, True])
def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(augmented):
    spec = augmented_spec(**({"flip": True, "translate": 2, "crop": 2, "mixup": 0.4} if augmented else {}))
    x, y = random_images(20), np.eye(20, dtype=np.float32)
    from_start, resumed = TrainingBatches(x, y, spec, first_epoch=0), TrainingBatches(x, y, spec, first_epoch=1)
    assert from_start.num_batches == 9 and resumed.num_batches == 6  # ceil(20 / 8) batches per epoch
    for index in range(6):
        for a, b in zip(from_start[index + 3], resumed[index]):
            np.testing.assert_array_equal(a, b)
    epoch_images = np.concatenate([from_start[index][0] for index in range(3)])
    assert not np.array_equal(np.concatenate([from_start[index][0] for index in range(3, 6)]), epoch_images)
    if not augmented:  # each epoch holds every image once
        np.testing.assert_array_equal(np.sort(epoch_images.reshape(20, -1), axis=0), np.sort(x.reshape(20, -1), axis=0))


def test_every_epoch_has_its_own_batch_order():
    # Keras's model.fit(x, y, shuffle=True) replays one order in every epoch once
    # keras.utils.set_random_seed has been called (Keras 3.15, TensorFlow 2.21), which the train
    # stage does: the stage must reshuffle by (seed, epoch) itself, as the assignment's unseeded
    # notebook did.
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
    batches = TrainingBatches(x, np.eye(20, dtype=np.float32), augmented_spec(epochs=4, batch_size=5), first_epoch=0)
    orders = [tuple(np.concatenate([batches[epoch * 4 + step][0].ravel() for step in range(4)])) for epoch in range(4)]
    assert all(sorted(order) == list(range(20)) for order in orders)  # each epoch sees every image once
    assert len(set(orders)) == 4


@pytest.mark.parametrize("flip", ["alternate", True])
def test_flips_mirror_half_the_images_alternating_ones_each_in_every_other_epoch(flip):
    # Through the train stage's batches: each image (told apart by its label) is mirrored or not;
    # about half are in each epoch; alternating flips mirror each in exactly one of any two epochs in a row.
    x, y = random_images(200), np.eye(200, dtype=np.float32)
    batches = TrainingBatches(x, y, augmented_spec(batch_size=16, flip=flip), first_epoch=0)
    mirrored_by_epoch = []
    for epoch in range(3):
        mirrored = np.zeros(200, bool)
        for step in range(batches.steps_per_epoch):
            images, labels = batches[epoch * batches.steps_per_epoch + step]
            for image, index in zip(images, np.argmax(labels, axis=1)):
                assert np.array_equal(image, x[index][:, ::-1]) or np.array_equal(image, x[index])
                mirrored[index] = np.array_equal(image, x[index][:, ::-1])
        mirrored_by_epoch.append(mirrored)
        assert 70 < mirrored.sum() < 130
    if flip == "alternate":
        np.testing.assert_array_equal(mirrored_by_epoch[1], ~mirrored_by_epoch[0])
        np.testing.assert_array_equal(mirrored_by_epoch[2], mirrored_by_epoch[0])
    else:
        assert 60 < (mirrored_by_epoch[1] != mirrored_by_epoch[0]).sum() < 140  # drawn anew
