import math

import keras
import numpy as np
import pytest

from resnet_cifar.models import (NO_NORM, ConvStyle, Norm, PartialDirac, channel_stats, conv_block, prenorm_block,
                                 residual_block, whitening_kernel)
from resnet_cifar.runtime import precision_policy
from support import built


def relu(x):
    return np.maximum(x, 0)


def test_baseline_has_the_assignments_parameter_count():
    assert built([256, 128], 10).count_params() == 985_482


def test_deeper_variant_parameter_count():
    # 3072*512+512 + 2*(512*512+512) + 512*512+512 + 2*(512*512+512) + 512*256+256
    # + 2*(256*256+256) + 256*128+128 + 2*(128*128+128) + 128*10+10
    assert built([512, 512, 256, 128], 10).count_params() == 3_216_778


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
    # On an array the block computes what the same block (same seed, same weights) computes in a model.
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    keras.utils.set_random_seed(7)
    out = np.asarray(residual_block(x, 5))
    keras.utils.set_random_seed(7)
    inputs = keras.Input(shape=(5,))
    model = keras.Model(inputs, residual_block(inputs, 5))
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out, model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert (out == 0).any() and (out > 0).any()  # the ReLU after the sum cut some, not all


def test_layer_order_follows_the_architecture():
    model = built([8, 4], 3, input_shape=(2, 2, 3), dropout=0.5, l2=[0.1, 0.2])
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
    model = built([4], 2, input_shape=(3,), l2=[0.5])
    kernel = model.get_layer("stage1_dense").kernel.numpy()
    (penalty,) = [float(loss) for loss in model.losses]
    assert penalty == pytest.approx(0.5 * np.sum(kernel**2), rel=1e-5)


def test_without_dropout_or_l2_no_such_layers():
    model = built([4], 2, input_shape=(3,))
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert model.losses == []


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def layer_norm(x, gamma, beta, epsilon=1e-3):
    mean, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def test_prenorm_block_keeps_the_residual_path_linear():
    inputs = keras.Input(shape=(6,))
    block = keras.Model(inputs, prenorm_block(inputs, 6, hidden=12, activation="gelu", norm=Norm("layer", 0.99, True), name="b"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    norm = block.get_layer("b_norm")
    norm.set_weights([rng.normal(size=6), rng.normal(size=6)])  # not the identity init
    w1, b1 = block.get_layer("b_dense1").get_weights()
    w2, b2 = block.get_layer("b_dense2").get_weights()
    expected = x + gelu(layer_norm(x, *norm.get_weights()) @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(block.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
    assert (expected < 0).any()  # no activation after the sum


def test_blocks_expansion_and_norm_parameter_counts():
    # Flatten 12 -> Dense 8 (104); each block 8->16->8 (144 + 136); classifier 8->3 (27).
    assert built([8], 3, input_shape=(2, 2, 3), blocks=2, expansion=2).count_params() == 104 + 2 * 280 + 27
    # Pre-norm with layer norm: gamma and beta (16) before each block and before the classifier.
    prenorm = built([8], 3, input_shape=(2, 2, 3), blocks=2, expansion=2, norm="layer", prenorm=True)
    assert prenorm.count_params() == 104 + 2 * (280 + 16) + 16 + 27
    # Post-norm batch norm: 4 x units (gamma, beta, moving mean and variance) after each Dense;
    # one block 8->8->8 (72 + 72).
    postnorm = built([8], 3, input_shape=(2, 2, 3), norm="batch")
    assert postnorm.count_params() == 104 + 32 + 72 + 32 + 72 + 32 + 27


def test_postnorm_layer_order():
    model = built([8], 3, input_shape=(2, 2, 3), blocks=2, activation="gelu", norm="layer")
    assert [layer.name for layer in model.layers] == [
        "image", "flatten", "stage1_dense", "stage1_dense_norm", "stage1_dense_act",
        "stage1_block1_dense1", "stage1_block1_dense1_norm", "stage1_block1_dense1_act",
        "stage1_block1_dense2", "stage1_block1_dense2_norm", "stage1_block1_add", "stage1_block1_out",
        "stage1_block2_dense1", "stage1_block2_dense1_norm", "stage1_block2_dense1_act",
        "stage1_block2_dense2", "stage1_block2_dense2_norm", "stage1_block2_add", "stage1_block2_out",
        "classifier",
    ]
    assert model.get_layer("stage1_block1_out").activation.__name__ == "gelu"


def test_mixed_precision_computes_in_bfloat16_and_outputs_float32():
    with precision_policy("bfloat16"):
        model = built([8], 3, input_shape=(2, 2, 3))
    assert keras.mixed_precision.dtype_policy().name == "float32"  # as before the block
    assert model.get_layer("stage1_dense").compute_dtype == "bfloat16"
    assert model.get_layer("stage1_dense").kernel.dtype == "float32"  # weights stay float32
    assert model(np.ones((1, 2, 2, 3), np.float32)).dtype == "float32"


def resnet(blocks_per_stage: int, **kwargs) -> keras.Model:
    """He et al.'s CIFAR ResNet-(6n+2): a 16-filter stem, three stages of 16, 32 and 64 filters."""
    return built([16, 32, 64], 10, arch="conv", blocks=blocks_per_stage, stem=16, downsample="stride",
                 norm="batch", **kwargs)


def trainable(model: keras.Model) -> int:
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


@pytest.mark.parametrize("depth, blocks_per_stage, parameters, trainable_parameters", [
    (20, 3, 274_042, 272_474),  # "0.27M" in He et al. 2016, table 6
    (56, 9, 860_026, 855_770),  # "0.85M"
])
def test_resnet_20_and_56_parameter_counts(depth, blocks_per_stage, parameters, trainable_parameters):
    model = resnet(blocks_per_stage)
    assert model.count_params() == parameters and trainable(model) == trainable_parameters
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
                    and "projection" not in layer.name]
    assert len(convolutions) + 1 == depth  # and the classifier
    # Stage 2 and 3 start with a strided block and a 1x1 projection; the image shrinks 32 -> 16 -> 8.
    assert [layer.name for layer in model.layers if "projection" in layer.name and "norm" not in layer.name] == [
        "stage2_block1_projection", "stage3_block1_projection"]
    assert model.get_layer("stage3_block1_out").output.shape[1:] == (8, 8, 64)


def conv2d_same(x: np.ndarray, kernel: np.ndarray, stride: int = 1) -> np.ndarray:
    """TensorFlow's "same" convolution, written out: pad (the extra pixel after), then slide."""
    k, (n, height, width, _) = kernel.shape[0], x.shape
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h, pad_w = max((out_h - 1) * stride + k - height, 0), max((out_w - 1) * stride + k - width, 0)
    padded = np.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)])
    out = np.zeros((n, out_h, out_w, kernel.shape[-1]), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("filters, strides", [(3, 1), (5, 2)], ids=["identity", "projection"])
def test_conv_block_computes_he_et_als_equations(filters, strides):
    inputs = keras.Input(shape=(4, 4, 3))
    block = keras.Model(inputs, conv_block(inputs, filters, strides, ConvStyle("relu", NO_NORM, "he"), name="b"))
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    (w1,), (w2,) = block.get_layer("b_conv1").get_weights(), block.get_layer("b_conv2").get_weights()
    h = conv2d_same(relu(conv2d_same(x, w1, strides)), w2)
    if strides == 1:
        shortcut = x  # the identity
        assert not any("projection" in layer.name for layer in block.layers)
    else:
        (projection,) = block.get_layer("b_projection").get_weights()
        assert projection.shape == (1, 1, 3, filters)
        shortcut = conv2d_same(x, projection, strides)
    expected = relu(h + shortcut)  # the activation comes after the sum, as in the dense block
    assert expected.shape == (2, 4 // strides, 4 // strides, filters)
    np.testing.assert_allclose(block.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_pool_downsampling_builds_pages_resnet9_shape():
    model = built([32, 64, 128], 10, arch="conv", blocks=[1, 0, 1], stem=16, downsample="pool", norm="batch")
    shapes = {name: model.get_layer(name).output.shape[1:] for name in
              ("stem_conv_act", "stage1_pool", "stage1_block1_out", "stage2_pool", "stage3_block1_out", "pool")}
    assert shapes == {"stem_conv_act": (32, 32, 16), "stage1_pool": (16, 16, 32), "stage1_block1_out": (16, 16, 32),
                      "stage2_pool": (8, 8, 64), "stage3_block1_out": (4, 4, 128), "pool": (128,)}
    assert not any(layer.name.startswith("stage2_block") for layer in model.layers)


def test_preactivation_blocks_normalize_before_each_convolution():
    model = resnet(1, prenorm=True)
    names = [layer.name for layer in model.layers]
    assert names[:3] == ["image", "stem_conv", "stage1_block1_pre_norm"]
    assert "stem_conv_norm" not in names and names[-3:] == ["final_act", "pool", "classifier"]
    assert names.index("stage2_block1_projection") > names.index("stage2_block1_pre_act")


def test_standardization_is_a_layer_saved_with_the_model(tmp_path):
    rng = np.random.default_rng(1)
    images = (rng.normal(size=(50, 2, 2, 3)) * [0.2, 0.3, 0.4] + [0.5, 0.4, 0.3]).astype(np.float32)
    mean, variance = channel_stats(images)
    built([4], 2, training_images=images, standardize=True).save(tmp_path / "m.keras")
    model = keras.models.load_model(tmp_path / "m.keras")  # what evaluate and any later use see
    standardize = keras.Model(model.input, model.get_layer("standardize").output)
    x = np.random.default_rng(0).uniform(size=(3, 2, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(standardize.predict(x, verbose=0), (x - mean) / np.sqrt(variance), rtol=1e-5)


def correlated_images(count: int = 200, seed: int = 0) -> np.ndarray:
    """Smooth random images: neighbouring pixels and the channels strongly correlated, as in photos."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(count, 9, 9, 1))
    smooth = base[:, :-1, :-1] + base[:, 1:, :-1] + base[:, :-1, 1:] + base[:, 1:, 1:]
    return (smooth * np.array([1.0, 0.8, 0.6]) + 0.1 * rng.normal(size=(count, 8, 8, 3))).astype(np.float32)


def test_whitening_kernel_decorrelates_the_patches_and_adds_their_negatives():
    images = correlated_images()
    kernel = whitening_kernel(images, epsilon=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])
    windows = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12).astype(np.float64)
    raw = patches.T @ patches / len(patches)
    assert np.abs(raw - np.diag(np.diag(raw))).max() > 0.5  # correlated before
    whitened = patches @ kernel[..., :12].reshape(12, 12)
    np.testing.assert_allclose(whitened.T @ whitened / len(whitened), np.eye(12), atol=1e-6)


def test_the_whitening_stem_is_fixed_whitens_the_standardized_images_and_is_saved(tmp_path):
    images = correlated_images()
    mean, variance = channel_stats(images)
    model = built([4], 3, arch="conv", blocks=[0], stem="whiten", downsample="pool", norm="batch",
                  standardize=True, training_images=images)
    whiten = model.get_layer("stem_whiten")
    assert [w.name for w in whiten.trainable_weights] == ["bias"]  # the filters never train
    expected = whitening_kernel((images - mean) / np.sqrt(variance))
    np.testing.assert_allclose(whiten.kernel.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert model.get_layer("stem_whiten_act").output.shape[1:] == (7, 7, 24)  # "valid" 2x2: one pixel less
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.get_layer("stem_whiten").kernel.numpy(), whiten.kernel.numpy())


def test_dirac_initialization_passes_the_first_channels_through():
    kernel = PartialDirac(seed=1)((3, 3, 4, 6)).numpy()
    x = np.random.default_rng(2).normal(size=(1, 5, 5, 4)).astype(np.float32)
    y = keras.ops.conv(x, kernel, padding="same").numpy()
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)  # identity on the first four filters
    assert np.std(kernel[..., 4:]) > 0.1 and np.count_nonzero(kernel[..., 4:]) == 3 * 3 * 4 * 2  # He-normal
    model = built([4], 2, input_shape=(8, 8, 3), arch="conv", blocks=1, stem=4, downsample="pool",
                        norm="batch", conv_init="dirac")
    square = model.get_layer("stage1_block1_conv2").kernel.numpy()
    np.testing.assert_array_equal(square[1, 1], np.eye(4))  # a square convolution starts as the identity
    assert np.count_nonzero(square) == 4


def test_pool_first_transitions_normalize_and_activate_the_pooled_pixels():
    def order(downsample):
        model = built([8], 2, input_shape=(8, 8, 3), arch="conv", blocks=[0], stem=4, downsample=downsample,
                            norm="batch")
        return [layer.name for layer in model.layers if layer.name.startswith("stage1")]
    assert order("pool_first") == ["stage1_conv", "stage1_pool", "stage1_conv_norm", "stage1_conv_act"]
    assert order("pool") == ["stage1_conv", "stage1_conv_norm", "stage1_conv_act", "stage1_pool"]


def test_batch_norm_momentum_and_frozen_scales_reach_every_batch_norm():
    model = built([4, 8], 2, input_shape=(8, 8, 3), arch="conv", blocks=1, stem=4, downsample="pool_first",
                        norm="batch", norm_momentum=0.6, norm_scale=False)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 7 and all(norm.momentum == 0.6 and norm.gamma is None for norm in norms)


def test_logit_scale_divides_the_logits_before_the_softmax():
    model = built([4], 3, input_shape=(2, 2, 3), logit_scale=0.25)
    x = np.random.default_rng(3).normal(size=(5, 2, 2, 3)).astype(np.float32)
    logits = keras.Model(model.input, model.get_layer("classifier").output).predict(x, verbose=0)
    scaled = np.exp(0.25 * logits) / np.exp(0.25 * logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), scaled, rtol=1e-5)
    assert built([4], 3, input_shape=(2, 2, 3)).count_params() == model.count_params()


def test_batch_norm_statistics_are_computed_and_kept_in_float32_under_bfloat16():
    """As airbench keeps them: a batch's mean of bfloat16 activations summed in bfloat16 would be
    off by far more than float32 rounding (bfloat16 keeps 8 bits of mantissa)."""
    rng = np.random.default_rng(0)
    with precision_policy("bfloat16"):
        norm = keras.layers.BatchNormalization(momentum=0.0)
        activations = keras.ops.cast(1 + rng.random((64, 8, 8, 4), np.float32), "bfloat16")
        norm(activations, training=True)
    assert norm.moving_mean.dtype == norm.moving_variance.dtype == "float32"
    exact = keras.ops.convert_to_numpy(keras.ops.cast(activations, "float32")).astype(np.float64)
    np.testing.assert_allclose(norm.moving_mean.numpy(), exact.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(norm.moving_variance.numpy(), exact.var(axis=(0, 1, 2)), rtol=1e-4)


def test_plain_blocks_and_max_pooling_build_airbench94s_network():
    """Three stages of 64, 256 and 256 filters, each a conv -> pool -> norm -> act transition and
    one conv -> norm -> act block, no shortcut, the last stage max-pooled: airbench94's layout and
    its 1,967,616 convolution weights (from 24 whitened channels)."""
    model = built([64, 256, 256], 10, arch="conv", blocks=[1, 1, 1], stem="whiten", downsample="pool_first",
                  norm="batch", shortcuts=False, head_pool="max")
    kernels = [layer.kernel.shape for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert kernels == [(3, 3, 24, 64), (3, 3, 64, 64), (3, 3, 64, 256), (3, 3, 256, 256), (3, 3, 256, 256),
                       (3, 3, 256, 256)]
    assert sum(math.prod(shape) for shape in kernels) == 1_967_616
    assert not any(isinstance(layer, keras.layers.Add) for layer in model.layers)
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalMaxPooling2D)
    assert isinstance(built([8], 10, arch="conv", blocks=1, stem=4, downsample="pool").get_layer("pool"),
                      keras.layers.GlobalAveragePooling2D)
