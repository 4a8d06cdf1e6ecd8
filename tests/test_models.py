import keras
import numpy as np
import pytest

from resnet_cifar.models import build_model, residual_block


def relu(x):
    return np.maximum(x, 0)


def test_baseline_has_the_assignments_parameter_count():
    assert build_model([256, 128], num_classes=10).count_params() == 985_482


def test_deeper_variant_parameter_count():
    # 3072*512+512 + 2*(512*512+512) + 512*512+512 + 2*(512*512+512) + 512*256+256
    # + 2*(256*256+256) + 256*128+128 + 2*(128*128+128) + 128*10+10
    assert build_model([512, 512, 256, 128], num_classes=10).count_params() == 3_216_778


def test_block_matches_the_assignments_equations():
    inputs = keras.Input(shape=(6,))
    block = keras.Model(inputs, residual_block(inputs, 6, name="b"))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    w1, b1 = block.get_layer("b_dense1").get_weights()
    w2, b2 = block.get_layer("b_dense2").get_weights()
    a1 = relu(x @ w1 + b1)
    z2 = a1 @ w2 + b2
    expected = relu(z2 + x)  # the activation comes after the sum
    np.testing.assert_allclose(block.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert (expected == 0).any() and (expected > 0).any()


def test_block_runs_on_a_concrete_array_like_exercise_2():
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    out = np.asarray(residual_block(x, 5))
    assert out.shape == (3, 5)
    assert (out >= 0).all()


def test_layer_order_follows_the_architecture():
    model = build_model([8, 4], num_classes=3, input_shape=(2, 2, 3), dropout=0.5, l2=[0.1, 0.2])
    names = [layer.name for layer in model.layers]
    assert names == [
        "image", "flatten",
        "stage1_dense", "stage1_dropout", "stage1_block_dense1", "stage1_block_dense2",
        "stage1_block_add", "stage1_block_out",
        "stage2_dense", "stage2_dropout", "stage2_block_dense1", "stage2_block_dense2",
        "stage2_block_add", "stage2_block_out",
        "classifier",
    ]
    assert model.get_layer("stage1_dropout").rate == 0.5
    assert model.get_layer("stage1_dense").kernel_regularizer.l2 == pytest.approx(0.1)
    assert model.get_layer("stage2_dense").kernel_regularizer.l2 == pytest.approx(0.2)
    assert model.get_layer("stage1_block_dense1").kernel_regularizer is None
    assert model.output_shape == (None, 3)


def test_l2_penalty_enters_the_loss():
    model = build_model([4], num_classes=2, input_shape=(3,), l2=[0.5])
    kernel = model.get_layer("stage1_dense").kernel.numpy()
    (penalty,) = [float(loss) for loss in model.losses]
    assert penalty == pytest.approx(0.5 * np.sum(kernel**2), rel=1e-5)


def test_without_dropout_or_l2_no_such_layers():
    model = build_model([4], num_classes=2, input_shape=(3,))
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert model.losses == []
