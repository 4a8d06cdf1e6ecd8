"""Residual networks for CIFAR: the assignment's dense family, and the convolutional family.

    dense: Flatten -> [transition(w) -> residual_block(w) x blocks] for each width w -> classifier
    conv:  stem -> [conv stage(w): residual blocks of w filters] for each width w -> pool -> classifier

The assignment's residual block computes act(Dense(units)(Dense(units, act)(x)) + x): the
activation comes after the sum, so the block's input must already have `units` features, which
the transition Dense before it guarantees. With params.yaml's defaults (one block per width,
expansion 1, relu, no normalization) `build_model` is exactly the assignment's network. The convolutional
block is the same idea with two 3x3 convolutions (He et al. 2016), or its pre-activation form.

The convolutional family also carries the ingredients of fast CIFAR-10 training (Jordan's airbench,
Page's ResNet-9), each off by default: a fixed patch-whitening first layer, the transition order
conv -> pool -> norm -> activation, identity (Dirac) initialization, batch norm's momentum and
frozen scales, and scaled-down logits.
"""

from dataclasses import dataclass, fields

import keras
import numpy as np
from keras import layers, regularizers

from resnet_cifar.params import VariantSpec

WHITENING_PATCH = 2  # the patch-whitening layer's patches: 2x2 pixels (airbench's)
WHITENING_EPSILON = 5e-4  # added to the patches' covariance eigenvalues (airbench's)
WHITENING_IMAGES = 5000  # the training images whose patches set the whitening filters (airbench's)


@dataclass(frozen=True)
class Network:
    """A network of either family, as params.yaml describes it: `Network.of` a variant's validated
    spec (params.py holds each key's check; params.yaml, its default). Per-width keys hold one value
    per width."""
    arch: str  # dense | conv
    widths: tuple[int, ...]  # dense: units per stage; conv: filters per stage
    blocks: tuple[int, ...]  # residual blocks per stage
    stem: int | str  # conv: filters of the stem convolution, or "whiten"
    downsample: str  # conv: stride | pool | pool_first
    conv_init: str  # conv: he | dirac
    norm_momentum: float  # batch norm: the old moving statistics' weight at each update
    norm_scale: bool  # batch norm learns a scale (gamma); False: only its offset (beta), as airbench
    expansion: float  # dense: a block's hidden width factor
    activation: str
    norm: str  # none | layer | batch
    prenorm: bool  # x + f(norm(x)) blocks
    shortcuts: bool  # conv: residual blocks; False: a block is one conv -> norm -> act (airbench)
    head_pool: str  # conv: average | max, over the last stage's pixels
    dropout: float  # dense: after each transition Dense
    l2: tuple[float, ...]  # dense: one factor per transition Dense
    logit_scale: float  # the classifier's logits times this
    standardize: bool  # a first layer standardizes each channel by the training images' statistics

    @classmethod
    def of(cls, spec: VariantSpec) -> "Network":
        return cls(**{key.name: getattr(spec, key.name) for key in fields(cls)})


@dataclass(frozen=True)
class Norm:
    """How layers are normalized: "none", "layer" (LayerNormalization), or "batch"
    (BatchNormalization with its moving statistics' momentum, whether it learns a scale, and
    whether it averages its statistics over the replicas itself: TensorFlow's MirroredStrategy)."""
    kind: str
    momentum: float
    scale: bool
    synchronized: bool = False

    def __call__(self, x, name: str):
        if self.kind == "none":
            return x
        if self.kind == "layer":
            return layers.LayerNormalization(name=f"{name}_norm")(x)
        return layers.BatchNormalization(momentum=self.momentum, scale=self.scale, synchronized=self.synchronized,
                                         name=f"{name}_norm")(x)


NO_NORM = Norm("none", momentum=0.0, scale=False)  # the assignment's blocks: no normalization (momentum, scale unused)


def normalized(x, norm: Norm, activation: str | None, name: str):
    """x -> norm -> activation, each only when asked for."""
    x = norm(x, name)
    return layers.Activation(activation, name=f"{name}_act")(x) if activation else x


def dense(x, units: int, activation: str | None, norm: Norm, name: str, **dense_kwargs):
    """Dense(units, activation), or Dense -> norm -> activation with a norm."""
    if norm.kind == "none":
        return layers.Dense(units, activation=activation, name=name, **dense_kwargs)(x)
    return normalized(layers.Dense(units, name=name, **dense_kwargs)(x), norm, activation, name)


def residual_block(x, units: int, hidden: int | None = None, activation: str = "relu", norm: Norm = NO_NORM,
                   name: str = "block"):
    """a1 = Dense(hidden, act)(x); z2 = Dense(units)(a1); return act(z2 + x).

    With a norm, each Dense is followed by it (before the activation). Works on a symbolic
    Keras tensor (to build a model) and on a concrete array alike.
    """
    a1 = dense(x, hidden or units, activation, norm, name=f"{name}_dense1")
    z2 = dense(a1, units, None, norm, name=f"{name}_dense2")
    summed = layers.Add(name=f"{name}_add")([z2, x])
    return layers.Activation(activation, name=f"{name}_out")(summed)


def prenorm_block(x, units: int, hidden: int, activation: str, norm: Norm, name: str):
    """x + Dense(units)(Dense(hidden, act)(norm(x))): the residual path stays linear."""
    h = normalized(x, norm, None, name)
    h = layers.Dense(hidden, activation=activation, name=f"{name}_dense1")(h)
    h = layers.Dense(units, name=f"{name}_dense2")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def transition(x, units: int, l2: float, dropout: float, activation: str | None, norm: Norm, name: str):
    """Dense(units, act) with optional L2 on its kernel and a norm, then optional Dropout."""
    x = dense(x, units, activation, norm, name=f"{name}_dense",
              kernel_regularizer=regularizers.L2(l2) if l2 else None)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def dense_features(x, network: Network, norm: Norm):
    """Flatten, then per width a transition Dense and its residual blocks. With `prenorm`, the
    transitions are linear (the blocks normalize their own input) and a final norm follows."""
    activation, prenorm = network.activation, network.prenorm
    x = layers.Flatten(name="flatten")(x)
    for stage, (units, count, factor) in enumerate(zip(network.widths, network.blocks, network.l2), start=1):
        x = transition(x, units, factor, network.dropout, None if prenorm else activation,
                       NO_NORM if prenorm else norm, name=f"stage{stage}")
        hidden = max(1, round(network.expansion * units))
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
    activation: str
    norm: Norm
    init: str  # he | dirac: He-normal, or He-normal with the identity in the first filters

    def normalized(self, x, activate: bool, name: str):
        """x -> norm -> activation (the activation only when asked for)."""
        return normalized(x, self.norm, self.activation if activate else None, name)

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


def plain_block(x, filters: int, strides: int, style: ConvStyle, name: str):
    """act(norm(conv(x))), without a shortcut: airbench's second convolution of a stage."""
    return style.normalized(style.conv(x, filters, f"{name}_conv", strides=strides), True, f"{name}_conv")


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


def conv_features(x, network: Network, style: ConvStyle, whitening: np.ndarray | None):
    """The stem, then per width a stage of blocks (residual, or plain without `shortcuts`), then
    global average or max pooling (`head_pool`). Each stage after the first halves the image:
    `stride`, by a strided first block (He et al.'s ResNet-20/56); `pool` and `pool_first`, by a
    conv-pool transition before its blocks (every stage has one; Page's ResNet-9, airbench)."""
    x = conv_stem(x, network.stem, style, network.prenorm, whitening)
    block = plain_block if not network.shortcuts else preactivation_block if network.prenorm else conv_block
    for stage, (filters, count) in enumerate(zip(network.widths, network.blocks), start=1):
        if network.downsample != "stride":
            x = conv_transition(x, filters, style, network.downsample == "pool_first", name=f"stage{stage}")
        for index in range(1, count + 1):
            strides = 2 if network.downsample == "stride" and stage > 1 and index == 1 else 1
            x = block(x, filters, strides, style, name=f"stage{stage}_block{index}")
    if network.prenorm:
        x = style.normalized(x, True, "final")
    pool = layers.GlobalMaxPooling2D if network.head_pool == "max" else layers.GlobalAveragePooling2D
    return pool(name="pool")(x)


def classifier(x, num_classes: int, logit_scale: float):
    """Softmax over Dense logits, times `logit_scale` where it is not 1 (Page's ResNet-9 and
    airbench scale them down, so the classifier learns no faster than the layers before it)."""
    # float32 probabilities even under mixed precision, for a stable loss.
    if logit_scale == 1:
        return layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="classifier")(x)
    logits = layers.Rescaling(logit_scale, dtype="float32", name="logit_scale")(logits)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the images (float64 sums, for exactness)."""
    return images.mean(axis=(0, 1, 2), dtype=np.float64), images.var(axis=(0, 1, 2), dtype=np.float64)


def build_model(network: Network, num_classes: int, training_images: np.ndarray, name: str,
                synchronized_norm: bool = False) -> keras.Model:
    """The network's features, then the softmax classifier. The training images give the input's
    shape; with `standardize`, their per-channel statistics make a first layer that standardizes
    the input (saved with the model); with `stem: whiten`, the patches of the first of them,
    standardized as the layer sees them, set its filters. `synchronized_norm`: batch norm averages
    its statistics over the replicas (TensorFlow's; runtime.synchronized_norm)."""
    inputs = keras.Input(shape=training_images.shape[1:], name="image")
    x, sample = inputs, training_images[:WHITENING_IMAGES]
    if network.standardize:
        mean, variance = channel_stats(training_images)
        x = layers.Normalization(mean=mean, variance=variance, name="standardize")(x)
        sample = (sample - mean) / np.sqrt(variance)
    norm = Norm(network.norm, network.norm_momentum, network.norm_scale, synchronized_norm)
    if network.arch == "conv":
        whitening = whitening_kernel(sample) if network.stem == "whiten" else None
        x = conv_features(x, network, ConvStyle(network.activation, norm, network.conv_init), whitening)
    else:
        x = dense_features(x, network, norm)
    return keras.Model(inputs, classifier(x, num_classes, network.logit_scale), name=name)
