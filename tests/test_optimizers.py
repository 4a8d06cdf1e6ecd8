"""The optimizers and their schedules (optimizers.py)."""

import dataclasses
import math
import os
import subprocess
import sys

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
    from_a_fifth = optimizers.learning_rate(dataclasses.replace(spec, warmup_from=0.2), steps_per_epoch=5)
    assert [float(from_a_fifth(step)) for step in (0, 5, 10)] == pytest.approx([0.002, 0.006, 0.01])
    assert float(from_a_fifth(30)) == pytest.approx(rates[30])  # the decay is the same


def dense_model() -> keras.Model:
    return built([8], 10, input_shape=(4, 4, 3))


def test_nesterov_and_muon_take_the_momentum_key():
    params = project_params()
    params["variants"]["conv"] |= {"momentum": 0.8, "muon_lr_factor": 1.0}  # the factor: muon's alone
    for name in ("nesterov", "muon"):
        params["variants"]["conv"]["optimizer"] = name
        model = built([8], 10, input_shape=(8, 8, 3), arch="conv", blocks=1, stem=4, downsample="pool", norm="batch")
        made = optimizers.optimizer(variant_spec(params, "conv"), 10, model)
        assert made.momentum == pytest.approx(0.8) and made.nesterov


def test_adamw_takes_a_weight_decay():
    params = project_params()
    params["variants"]["deeper"] |= {"optimizer": "adamw", "weight_decay": 0.05}
    built = optimizers.optimizer(variant_spec(params, "deeper"), 10, dense_model())
    assert isinstance(built, keras.optimizers.AdamW) and built.weight_decay == pytest.approx(0.05)


def test_lion_steps_by_the_sign_of_the_gradient_and_decays_the_weights():
    params = project_params()
    params["variants"]["deeper"] |= {"optimizer": "lion", "learning_rate": 0.01, "weight_decay": 0.1}
    built = optimizers.optimizer(variant_spec(params, "deeper"), 10, dense_model())
    weights = keras.Variable(np.ones(3, np.float32))
    built.apply_gradients([(np.array([3.0, -0.5, 0.0], np.float32), weights)])
    decayed = 1 - 0.01 * 0.1
    np.testing.assert_allclose(weights.numpy(), [decayed - 0.01, decayed + 0.01, decayed], rtol=1e-6)


def newton_schulz_reference(matrix: np.ndarray) -> np.ndarray:
    """airbench94_muon's zeropower_via_newtonschulz5, in NumPy and float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(3):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def muon_reference(kernel: np.ndarray, gradients: list[np.ndarray], learning_rate: float) -> np.ndarray:
    """airbench94_muon's Muon.step on a PyTorch filter bank (filters, channels, height, width), from
    a Keras kernel (height, width, channels, filters), one step per gradient."""
    weights, momentum = kernel.transpose(3, 2, 0, 1).astype(np.float64), 0
    for gradient in gradients:
        gradient = gradient.transpose(3, 2, 0, 1)
        momentum = 0.6 * momentum + gradient
        update = gradient + 0.6 * momentum
        weights = weights * len(weights) ** 0.5 / np.linalg.norm(weights)
        weights = weights - learning_rate * newton_schulz_reference(update.reshape(len(update), -1)).reshape(
            update.shape)
    return weights.transpose(2, 3, 1, 0)


# optimizers.SGD's steps on the backend of the process, saved to argv[1] (.npz): two of muon on a
# filter bank and a bias; ten of SGD with lookahead over a run of ten; six of Nesterov SGD with
# weight decay, its first weight frozen after three steps.
OPTIMIZER_STEPS = """
import sys
import keras
import numpy as np
from resnet_cifar.optimizers import SGD


def stepped(optimizer, gradients, variables):
    for step_gradients in gradients:
        optimizer.apply_gradients(zip(step_gradients, variables))
    return [variable.numpy() for variable in variables]


rng = np.random.default_rng(0)
kernel = keras.Variable(rng.normal(size=(3, 3, 2, 5)).astype("float32"), name="kernel")
bias = keras.Variable(np.ones(5, "float32"), name="bias")
muon = SGD(muon_factor=0.5, muon_paths=(kernel.path,), learning_rate=0.4, momentum=0.9, nesterov=True)
muon_kernel, muon_bias = stepped(muon, [(rng.normal(size=(3, 3, 2, 5)).astype("float32"), np.full(5, 0.5, "float32"))
                                        for _ in range(2)], [kernel, bias])

weight = keras.Variable(np.zeros(3, "float32"), name="weight")
lookahead = SGD(learning_rate=0.1, lookahead_total=10)
lookahead_fast, = stepped(lookahead, [(np.array([1.0, -2.0, 0.5], "float32"),)] * 10, [weight])
lookahead.finalize_variable_values([weight])

frozen, free = keras.Variable(np.ones(2, "float32"), name="frozen"), keras.Variable(np.ones(2, "float32"), name="free")
freezing = SGD(frozen_paths=(frozen.path,), frozen_after=3, learning_rate=0.1, momentum=0.9, nesterov=True,
               weight_decay=0.1)
history = [stepped(freezing, [(np.full(2, 0.5, "float32"),) * 2], [frozen, free]) for _ in range(6)]
np.savez(sys.argv[1], muon_kernel=muon_kernel, muon_bias=muon_bias, lookahead_fast=lookahead_fast,
         lookahead_final=weight.numpy(), frozen=np.array([step[0] for step in history]),
         free=np.array([step[1] for step in history]))
"""


@pytest.fixture(scope="module", params=["tensorflow", "jax"])
def stepped(request, tmp_path_factory) -> dict[str, np.ndarray]:
    """OPTIMIZER_STEPS' results on each backend."""
    saved = tmp_path_factory.mktemp(request.param) / "steps.npz"
    subprocess.run([sys.executable, "-c", OPTIMIZER_STEPS, str(saved)], check=True, timeout=300,
                   env=os.environ | {"KERAS_BACKEND": request.param})
    return dict(np.load(saved))


def test_muon_steps_filters_as_airbench_does_and_the_rest_as_nesterov_sgd(stepped):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 5))
    gradients = [rng.normal(size=(3, 3, 2, 5)).astype("float32") for _ in range(2)]
    np.testing.assert_allclose(stepped["muon_kernel"], muon_reference(kernel, gradients, 0.4 * 0.5),
                               rtol=1e-4, atol=1e-5)
    # Nesterov SGD: m = 0.9 m - lr g; w += 0.9 m - lr g.
    first = 0.9 * -0.2 - 0.2
    second = 0.9 * (0.9 * -0.2 - 0.2) - 0.2
    np.testing.assert_allclose(stepped["muon_bias"], 1 + first + second, rtol=1e-6)


def test_lookahead_moves_slow_weights_every_five_steps_and_ends_on_them(stepped):
    gradient, weights, slow = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
    for step in range(1, 11):
        weights = weights - 0.1 * gradient
        if step % 5 == 0:
            decay = 0.95 ** 5 * (step / 10) ** 3
            slow = slow + (1 - decay) * (weights - slow)
            weights = slow
    np.testing.assert_allclose(stepped["lookahead_fast"], weights, rtol=1e-5)
    np.testing.assert_allclose(stepped["lookahead_final"], slow, rtol=1e-5)
    assert not np.allclose(weights, -gradient)  # lookahead changed the path: plain SGD would end at -g


def test_a_frozen_weight_stops_changing_after_its_steps_and_the_others_go_on(stepped):
    frozen, free = stepped["frozen"], stepped["free"]
    np.testing.assert_array_equal(frozen[:3], free[:3])  # the same steps until it froze
    assert np.all(frozen[3:] == frozen[2]) and np.all(np.diff(free[2:], axis=0) < 0)


def test_filter_paths_are_the_trainable_convolution_kernels():
    model = built([4, 8], 3, input_shape=(8, 8, 3), arch="conv", blocks=1, stem="whiten", downsample="pool",
                  norm="batch")
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert optimizers.filter_paths(model) == tuple(layer.kernel.path for layer in convolutions
                                                    if layer.kernel.trainable)
    assert len(optimizers.filter_paths(model)) == 6  # the stems and the blocks' two each; whitening is fixed


def test_the_whitening_bias_is_the_patch_whitening_layers():
    model = built([4], 3, input_shape=(8, 8, 3), arch="conv", blocks=1, stem="whiten", downsample="pool",
                  norm="batch")
    assert optimizers.whitening_bias_paths(model) == (model.get_layer("stem_whiten").bias.path,)
