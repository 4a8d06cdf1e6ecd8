"""Residual networks for CIFAR: the assignment's dense family, and the convolutional family.

    dense: Flatten -> [transition(w) -> residual_block(w) x blocks] for each width w -> classifier
    conv:  stem -> [conv stage(w): residual blocks of w filters] for each width w -> pool -> classifier

The assignment's residual block computes act(Dense(units)(Dense(units, act)(x)) + x): the
activation comes after the sum, so the block's input must already have `units` features, which
the transition Dense before it guarantees. With the defaults (one block per width, expansion 1,
relu, no normalization) `build_model` is exactly the assignment's network. The convolutional
block is the same idea with two 3x3 convolutions (He et al. 2016), or its pre-activation form.

The convolutional family also carries the ingredients of fast CIFAR-10 training (Jordan's airbench,
Page's ResNet-9), each off by default: a fixed patch-whitening first layer, the transition order
conv -> pool -> norm -> activation, identity (Dirac) initialization, batch norm's momentum and
frozen scales, and scaled-down logits.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, regularizers

from resnet_cifar.runtime import synchronized_norm

WHITENING_PATCH = 2  # the patch-whitening layer's patches: 2x2 pixels (airbench's)
WHITENING_EPSILON = 5e-4  # added to the patches' covariance eigenvalues (airbench's)
WHITENING_IMAGES = 5000  # the training images whose patches set the whitening filters (airbench's)


def normalization(kind: str, name: str, momentum: float = 0.99, scale: bool = True) -> layers.Layer:
    """A LayerNormalization ("layer") or BatchNormalization ("batch", with its moving statistics'
    momentum and whether it learns a scale) layer."""
    if kind == "layer":
        return layers.LayerNormalization(name=name)
    # Synchronized where TensorFlow trains on several replicas: statistics of the whole global
    # batch, as on one device (only TensorFlow's batch norm takes the switch).
    return layers.BatchNormalization(momentum=momentum, scale=scale, synchronized=synchronized_norm(), name=name)


def normalized(x, norm: str, activation: str | None, name: str, momentum: float = 0.99, scale: bool = True):
    """x -> norm -> activation, each only when asked for (batch norm's momentum and scale as in
    `normalization`)."""
    if norm != "none":
        x = normalization(norm, f"{name}_norm", momentum, scale)(x)
    return layers.Activation(activation, name=f"{name}_act")(x) if activation else x


def dense(x, units: int, activation: str | None, norm: str, name: str, **dense_kwargs):
    """Dense(units, activation), or Dense -> norm -> activation when norm is not "none"."""
    if norm == "none":
        return layers.Dense(units, activation=activation, name=name, **dense_kwargs)(x)
    return normalized(layers.Dense(units, name=name, **dense_kwargs)(x), norm, activation, name)


def residual_block(x, units: int, hidden: int | None = None, activation: str = "relu",
                   norm: str = "none", name: str = "block"):
    """a1 = Dense(hidden, act)(x); z2 = Dense(units)(a1); return act(z2 + x).

    With a norm, each Dense is followed by it (before the activation). Works on a symbolic
    Keras tensor (to build a model) and on a concrete array alike.
    """
    a1 = dense(x, hidden or units, activation, norm, name=f"{name}_dense1")
    z2 = dense(a1, units, None, norm, name=f"{name}_dense2")
    summed = layers.Add(name=f"{name}_add")([z2, x])
    return layers.Activation(activation, name=f"{name}_out")(summed)


def prenorm_block(x, units: int, hidden: int, activation: str, norm: str, name: str):
    """x + Dense(units)(Dense(hidden, act)(norm(x))): the residual path stays linear."""
    h = normalized(x, norm, None, name)
    h = layers.Dense(hidden, activation=activation, name=f"{name}_dense1")(h)
    h = layers.Dense(units, name=f"{name}_dense2")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def transition(x, units: int, l2: float, dropout: float, activation: str | None, norm: str, name: str):
    """Dense(units, act) with optional L2 on its kernel and a norm, then optional Dropout."""
    x = dense(x, units, activation, norm, name=f"{name}_dense",
              kernel_regularizer=regularizers.L2(l2) if l2 else None)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def dense_features(x, widths: Sequence[int], blocks: Sequence[int], expansion: float, activation: str,
                   norm: str, prenorm: bool, dropout: float, l2: Sequence[float]):
    """Flatten, then per width a transition Dense and its residual blocks. With `prenorm`, the
    transitions are linear (the blocks normalize their own input) and a final norm follows."""
    x = layers.Flatten(name="flatten")(x)
    for stage, (units, count, factor) in enumerate(zip(widths, blocks, l2), start=1):
        x = transition(x, units, factor, dropout, None if prenorm else activation,
                       "none" if prenorm else norm, name=f"stage{stage}")
        hidden = max(1, round(expansion * units))
        for block in range(1, count + 1):
            # The assignment's single block per width keeps its original name.
            block_name = f"stage{stage}_block" + (f"{block}" if count > 1 else "")
            if prenorm:
                x = prenorm_block(x, units, hidden, activation, norm, name=block_name)
            else:
                x = residual_block(x, units, hidden, activation, norm, name=block_name)
    return normalized(x, norm, None, "final") if prenorm else x


@dataclass(frozen=True)
class ConvStyle:
    """How the convolutional family makes its layers."""
    activation: str = "relu"
    norm: str = "batch"
    norm_momentum: float = 0.99  # batch norm: the old moving statistics' weight at each update (Keras's)
    norm_scale: bool = True  # batch norm learns a scale (gamma); False: only its offset (beta), as airbench
    init: str = "he"  # he | dirac: He-normal, or He-normal with the identity in the first filters

    def normalized(self, x, activate: bool, name: str):
        """x -> norm -> activation (the activation only when asked for)."""
        return normalized(x, self.norm, self.activation if activate else None, name, self.norm_momentum,
                          self.norm_scale)

    def conv(self, x, filters: int, name: str, kernel_size: int = 3, strides: int = 1):
        """A bias-free convolution, "same" padded (a norm follows it, or its bias would be redundant)."""
        initializer = PartialDirac() if self.init == "dirac" else "he_normal"
        return layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                             kernel_initializer=initializer, name=name)(x)


@keras.saving.register_keras_serializable(package="resnet_cifar")
class PartialDirac(keras.initializers.Initializer):
    """He-normal kernels whose first min(inputs, outputs) filters are the identity (Dirac): filter i
    passes input channel i through unchanged (airbench initializes every convolution so)."""

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        rows, columns, inputs, outputs = shape
        kernel = keras.initializers.HeNormal(self.seed)(shape, dtype)
        identity = np.zeros(shape)
        channels = np.arange(min(inputs, outputs))
        identity[rows // 2, columns // 2, channels, channels] = 1
        return keras.ops.where(np.arange(outputs) < len(channels), keras.ops.cast(identity, kernel.dtype), kernel)

    def get_config(self):
        return {"seed": self.seed}


def whitening_kernel(images: np.ndarray, patch: int = WHITENING_PATCH, epsilon: float = WHITENING_EPSILON):
    """The filters that whiten the images' patch x patch patches: the eigenvectors of the patches'
    covariance (second moment), largest first, each divided by the square root of its eigenvalue
    (+ epsilon), followed by their negatives. A Conv2D kernel, (patch, patch, channels, 2 x patch² x channels)."""
    channels = images.shape[-1]
    size = patch * patch * channels
    covariance = np.zeros((size, size))
    count = 0
    for chunk in np.array_split(images, max(1, len(images) // 1000)):  # float64 sums, a chunk at a time
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (patch, patch), axis=(1, 2))
        flat = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, size).astype(np.float64)  # (row, column, channel)
        covariance += flat.T @ flat
        count += len(flat)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance / count)  # ascending
    filters = eigenvectors[:, ::-1] / np.sqrt(eigenvalues[::-1] + epsilon)
    return np.concatenate([filters, -filters], axis=1).reshape(patch, patch, channels, 2 * size)


@keras.saving.register_keras_serializable(package="resnet_cifar")
class PatchWhitening(layers.Layer):
    """A "valid" 2x2 convolution with fixed filters, from `whitening_kernel` (set when the model is
    built, saved with it), and a learned bias: airbench's first layer. It decorrelates neighbouring
    pixels and channels, so the first trained convolution starts from evenly scaled features."""

    def build(self, input_shape):
        filters = 2 * WHITENING_PATCH * WHITENING_PATCH * input_shape[-1]
        self.kernel = self.add_weight(shape=(WHITENING_PATCH, WHITENING_PATCH, input_shape[-1], filters),
                                      initializer="zeros", trainable=False, name="kernel")
        self.bias = self.add_weight(shape=(filters,), initializer="zeros", name="bias")

    def call(self, x):
        return keras.ops.conv(x, self.kernel, padding="valid") + self.bias


def conv_block(x, filters: int, strides: int, style: ConvStyle, name: str):
    """act(norm(conv(act(norm(conv(x))))) + shortcut(x)): He et al.'s basic block. The shortcut
    is the identity, or a strided 1x1 convolution and norm where the shape changes."""
    h = style.normalized(style.conv(x, filters, f"{name}_conv1", strides=strides), True, f"{name}_conv1")
    h = style.normalized(style.conv(h, filters, f"{name}_conv2"), False, f"{name}_conv2")
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = style.normalized(style.conv(x, filters, f"{name}_projection", 1, strides), False,
                                    f"{name}_projection")
    summed = layers.Add(name=f"{name}_add")([h, shortcut])
    return layers.Activation(style.activation, name=f"{name}_out")(summed)


def preactivation_block(x, filters: int, strides: int, style: ConvStyle, name: str):
    """x + conv(act(norm(conv(act(norm(x)))))): He et al.'s pre-activation block, whose residual
    path stays linear. A projection, where the shape changes, starts from act(norm(x))."""
    h = style.normalized(x, True, f"{name}_pre")
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = style.conv(h, filters, f"{name}_projection", 1, strides)
    h = style.conv(h, filters, f"{name}_conv1", strides=strides)
    h = style.conv(style.normalized(h, True, f"{name}_conv1"), filters, f"{name}_conv2")
    return layers.Add(name=f"{name}_add")([h, shortcut])


def conv_transition(x, filters: int, style: ConvStyle, pool_first: bool, name: str):
    """A stage's entry: conv -> norm -> act -> 2x2 max-pool (Page's ResNet-9), or with `pool_first`
    conv -> max-pool -> norm -> act (airbench: norm and activation on a quarter of the pixels)."""
    x = style.conv(x, filters, f"{name}_conv")
    pool = layers.MaxPooling2D(2, name=f"{name}_pool")
    if pool_first:
        return style.normalized(pool(x), True, f"{name}_conv")
    return pool(style.normalized(x, True, f"{name}_conv"))


def conv_stem(x, stem: int | str, style: ConvStyle, prenorm: bool, whitening: np.ndarray | None):
    """The first layer: a 3x3 convolution of `stem` filters (normalized and activated unless
    pre-activation blocks follow), or "whiten": the patch-whitening layer and the activation."""
    if stem == "whiten":
        whiten = PatchWhitening(name="stem_whiten")
        x = whiten(x)
        whiten.kernel.assign(whitening)
        return layers.Activation(style.activation, name="stem_whiten_act")(x)
    x = style.conv(x, stem, "stem_conv")
    return x if prenorm else style.normalized(x, True, "stem_conv")


def conv_features(x, widths: Sequence[int], blocks: Sequence[int], stem: int | str, downsample: str,
                  style: ConvStyle, prenorm: bool, whitening: np.ndarray | None):
    """The stem, then per width a stage of residual blocks, then global average pooling. Each stage
    after the first halves the image: `stride`, by a strided first block (He et al.'s ResNet-20/56);
    `pool` and `pool_first`, by a conv-pool transition before its blocks (every stage has one;
    Page's ResNet-9, airbench)."""
    x = conv_stem(x, stem, style, prenorm, whitening)
    block = preactivation_block if prenorm else conv_block
    for stage, (filters, count) in enumerate(zip(widths, blocks), start=1):
        if downsample != "stride":
            x = conv_transition(x, filters, style, downsample == "pool_first", name=f"stage{stage}")
        for index in range(1, count + 1):
            strides = 2 if downsample == "stride" and stage > 1 and index == 1 else 1
            x = block(x, filters, strides, style, name=f"stage{stage}_block{index}")
    if prenorm:
        x = style.normalized(x, True, "final")
    return layers.GlobalAveragePooling2D(name="pool")(x)


def classifier(x, num_classes: int, logit_scale: float):
    """Softmax over Dense logits, times `logit_scale` where it is not 1 (Page's ResNet-9 and
    airbench scale them down, so the classifier learns no faster than the layers before it)."""
    # float32 probabilities even under mixed precision, for a stable loss.
    if logit_scale == 1:
        return layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="classifier")(x)
    logits = layers.Rescaling(logit_scale, dtype="float32", name="logit_scale")(logits)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def build_model(
    widths: Sequence[int],
    num_classes: int,
    input_shape: Sequence[int] = (32, 32, 3),
    arch: str = "dense",
    blocks: int | Sequence[int] = 1,
    stem: int | str = 16,
    downsample: str = "stride",
    conv_init: str = "he",
    norm_momentum: float = 0.99,
    norm_scale: bool = True,
    logit_scale: float = 1.0,
    expansion: float = 1.0,
    activation: str = "relu",
    norm: str = "none",
    prenorm: bool = False,
    dropout: float = 0.0,
    l2: Sequence[float] | None = None,
    input_stats: tuple[np.ndarray, np.ndarray] | None = None,
    training_images: np.ndarray | None = None,
    name: str = "resnet",
) -> keras.Model:
    """The `arch` family's features ("dense" or "conv"), then the softmax classifier.

    `blocks` is one count for every width or one per width. Dense only: `l2` holds one factor
    per transition Dense (None: no L2), `dropout` follows every transition Dense (0: none).
    Conv only: `stem`, `downsample`, `conv_init`, `norm_momentum` and `norm_scale` (ConvStyle).
    `input_stats`, the per-channel (mean, variance) of the training images, adds a first layer that
    standardizes the input, saved with the model. `training_images` (a sample) are needed by
    `stem="whiten"`, whose filters whiten their patches (standardized first, as the layer sees them).
    """
    blocks = (blocks,) * len(widths) if isinstance(blocks, int) else tuple(blocks)
    l2 = tuple(l2) if l2 is not None else (0.0,) * len(widths)
    for key, values in (("blocks", blocks), ("l2", l2)):
        if len(values) != len(widths):
            raise ValueError(f"{key}: expected {len(widths)} values (one per width), got {len(values)}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if input_stats is not None:
        x = layers.Normalization(mean=input_stats[0], variance=input_stats[1], name="standardize")(x)
    if arch == "conv":
        whitening = None
        if stem == "whiten":
            if training_images is None:
                raise ValueError('stem "whiten": pass training_images, whose patches the first layer whitens')
            seen = training_images[:WHITENING_IMAGES]
            if input_stats is not None:
                seen = (seen - input_stats[0]) / np.sqrt(input_stats[1])
            whitening = whitening_kernel(seen)
        style = ConvStyle(activation, norm, norm_momentum, norm_scale, conv_init)
        x = conv_features(x, widths, blocks, stem, downsample, style, prenorm, whitening)
    else:
        x = dense_features(x, widths, blocks, expansion, activation, norm, prenorm, dropout, l2)
    return keras.Model(inputs, classifier(x, num_classes, logit_scale), name=name)
