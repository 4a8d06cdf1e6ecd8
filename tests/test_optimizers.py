"""The optimizers and their schedules (optimizers.py)."""

import dataclasses
import math

import keras
import numpy as np
import pytest

from support import built, project_params, tiny_params
from resnet_cifar import optimizers
from resnet_cifar.params import variant_spec


def sgd_steps(model: keras.Model, factor: float, gradient: float, **sgd_kwargs) -> dict[str, np.ndarray]:
    """Each weight's change in one step of optimizers.SGD (the weights are put back after it)."""
    start = [w.numpy() for w in model.trainable_weights]
    optimizer = optimizers.SGD(factor, optimizers.norm_weight_paths(model), learning_rate=0.1, **sgd_kwargs)
    optimizer.apply_gradients((np.full(w.shape, gradient, np.float32), w) for w in model.trainable_weights)
    steps = {w.path: w.numpy() - before for w, before in zip(model.trainable_weights, start)}
    for w, before in zip(model.trainable_weights, start):
        w.assign(before)
    return steps


def test_norm_lr_factor_scales_the_steps_of_the_norm_weights_alone():
    model = built([4], 3, input_shape=(4, 4, 3), arch="conv", blocks=1, stem=4, downsample="pool", norm="batch")
    norm_paths = optimizers.norm_weight_paths(model)
    assert set(norm_paths) == {w.path for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
                               for w in layer.trainable_weights} and len(norm_paths) == 8
    plain = sgd_steps(model, 1.0, 0.5, momentum=0.9, nesterov=True)
    boosted = sgd_steps(model, 4.0, 0.5, momentum=0.9, nesterov=True)
    for path, step in plain.items():
        np.testing.assert_allclose(boosted[path], 4 * step if path in norm_paths else step, rtol=1e-6)
    # Weight decay stays the same for every weight.
    plain, boosted = sgd_steps(model, 1.0, 0.0, weight_decay=0.1), sgd_steps(model, 4.0, 0.0, weight_decay=0.1)
    assert any(np.any(plain[path]) for path in norm_paths)  # the scales (gamma) decay
    for path, step in plain.items():
        np.testing.assert_array_equal(boosted[path], step)


def test_learning_rate_warms_up_then_decays():
    spec = variant_spec({**tiny_params(), "variants": {"v": {"widths": [4], "epochs": 10, "learning_rate": 0.01,
                                                             "warmup_epochs": 2, "schedule": "cosine"}}}, "v")
    schedule = optimizers.learning_rate(spec, steps_per_epoch=5)
    rates = [float(schedule(step)) for step in range(0, 51)]
    assert rates[0] == 0 and rates[5] == pytest.approx(0.005) and rates[10] == pytest.approx(0.01)
    assert rates[30] == pytest.approx(0.005, rel=1e-3)  # half-way through the cosine
    assert rates[50] == pytest.approx(0, abs=1e-9) and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    constant = optimizers.learning_rate(dataclasses.replace(spec, schedule="constant"), steps_per_epoch=5)
    assert float(constant(5)) == pytest.approx(0.005) and float(constant(50)) == pytest.approx(0.01)
    assert optimizers.learning_rate(dataclasses.replace(spec, schedule="constant", warmup_epochs=0), 5) == 0.01
    linear = optimizers.learning_rate(dataclasses.replace(spec, schedule="linear"), steps_per_epoch=5)
    assert float(linear(5)) == pytest.approx(0.005) and float(linear(20)) == pytest.approx(0.0075)
    assert float(schedule(20)) == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)) / 2)  # cosine, a quarter in
    assert float(linear(50)) == pytest.approx(0, abs=1e-9)


def test_adamw_takes_a_weight_decay():
    params = project_params()
    params["variants"]["deeper"] |= {"optimizer": "adamw", "weight_decay": 0.05}
    built = optimizers.optimizer(variant_spec(params, "deeper"), steps_per_epoch=10)
    assert isinstance(built, keras.optimizers.AdamW) and built.weight_decay == pytest.approx(0.05)


def test_lion_steps_by_the_sign_of_the_gradient_and_decays_the_weights():
    params = project_params()
    params["variants"]["deeper"] |= {"optimizer": "lion", "learning_rate": 0.01, "weight_decay": 0.1}
    built = optimizers.optimizer(variant_spec(params, "deeper"), steps_per_epoch=10)
    weights = keras.Variable(np.ones(3, np.float32))
    built.apply_gradients([(np.array([3.0, -0.5, 0.0], np.float32), weights)])
    decayed = 1 - 0.01 * 0.1
    np.testing.assert_allclose(weights.numpy(), [decayed - 0.01, decayed + 0.01, decayed], rtol=1e-6)
