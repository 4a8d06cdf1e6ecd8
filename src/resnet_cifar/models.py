"""Residual networks for CIFAR: the assignment's dense family, and the convolutional family.

    dense: Flatten -> [transition(w) -> residual_block(w) x blocks] for each width w -> classifier
    conv:  stem -> [conv stage(w): residual blocks of w filters] for each width w -> pool -> classifier

The assignment's residual block computes act(Dense(units)(Dense(units, act)(x)) + x): the
activation comes after the sum, so the block's input must already have `units` features, which
the transition Dense before it guarantees. With the defaults (one block per width, expansion 1,
relu, no normalization) `build_model` is exactly the assignment's network. The convolutional
block is the same idea with two 3x3 convolutions (He et al. 2016), or its pre-activation form.
"""

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers, regularizers


def normalization(kind: str, name: str) -> layers.Layer:
    """A LayerNormalization ("layer") or BatchNormalization ("batch") layer."""
    if kind == "layer":
        return layers.LayerNormalization(name=name)
    # Synchronized: under tf.distribute, statistics of the whole global batch, as on one device.
    return layers.BatchNormalization(synchronized=True, name=name)


def normalized(x, norm: str, activation: str | None, name: str):
    """x -> norm -> activation, each only when asked for."""
    if norm != "none":
        x = normalization(norm, name=f"{name}_norm")(x)
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


def conv(x, filters: int, name: str, kernel_size: int = 3, strides: int = 1):
    """A bias-free convolution, "same" padded (a norm follows it, or its bias would be redundant)."""
    return layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=name)(x)


def conv_block(x, filters: int, strides: int, activation: str, norm: str, name: str):
    """act(norm(conv(act(norm(conv(x))))) + shortcut(x)): He et al.'s basic block. The shortcut
    is the identity, or a strided 1x1 convolution and norm where the shape changes."""
    h = normalized(conv(x, filters, f"{name}_conv1", strides=strides), norm, activation, f"{name}_conv1")
    h = normalized(conv(h, filters, f"{name}_conv2"), norm, None, f"{name}_conv2")
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = normalized(conv(x, filters, f"{name}_projection", 1, strides), norm, None,
                              f"{name}_projection")
    summed = layers.Add(name=f"{name}_add")([h, shortcut])
    return layers.Activation(activation, name=f"{name}_out")(summed)


def preactivation_block(x, filters: int, strides: int, activation: str, norm: str, name: str):
    """x + conv(act(norm(conv(act(norm(x)))))): He et al.'s pre-activation block, whose residual
    path stays linear. A projection, where the shape changes, starts from act(norm(x))."""
    h = normalized(x, norm, activation, f"{name}_pre")
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv(h, filters, f"{name}_projection", 1, strides)
    h = conv(h, filters, f"{name}_conv1", strides=strides)
    h = conv(normalized(h, norm, activation, f"{name}_conv1"), filters, f"{name}_conv2")
    return layers.Add(name=f"{name}_add")([h, shortcut])


def conv_transition(x, filters: int, activation: str, norm: str, name: str):
    """conv -> norm -> act -> 2x2 max-pool: a stage's entry in Page's ResNet-9."""
    x = normalized(conv(x, filters, f"{name}_conv"), norm, activation, f"{name}_conv")
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x)


def conv_features(x, widths: Sequence[int], blocks: Sequence[int], stem: int, downsample: str,
                  activation: str, norm: str, prenorm: bool):
    """The stem convolution, then per width a stage of residual blocks, then global average
    pooling. Each stage after the first halves the image: `stride`, by a strided first block
    (He et al.'s ResNet-20/56); `pool`, by a conv-norm-act-pool transition before its blocks
    (every stage has one; Page's ResNet-9)."""
    x = conv(x, stem, "stem_conv")
    if not prenorm:  # pre-activation blocks normalize their own input
        x = normalized(x, norm, activation, "stem_conv")
    block = preactivation_block if prenorm else conv_block
    for stage, (filters, count) in enumerate(zip(widths, blocks), start=1):
        if downsample == "pool":
            x = conv_transition(x, filters, activation, norm, name=f"stage{stage}")
        for index in range(1, count + 1):
            strides = 2 if downsample == "stride" and stage > 1 and index == 1 else 1
            x = block(x, filters, strides, activation, norm, name=f"stage{stage}_block{index}")
    if prenorm:
        x = normalized(x, norm, activation, "final")
    return layers.GlobalAveragePooling2D(name="pool")(x)


def build_model(
    widths: Sequence[int],
    num_classes: int,
    input_shape: Sequence[int] = (32, 32, 3),
    arch: str = "dense",
    blocks: int | Sequence[int] = 1,
    stem: int = 16,
    downsample: str = "stride",
    expansion: float = 1.0,
    activation: str = "relu",
    norm: str = "none",
    prenorm: bool = False,
    dropout: float = 0.0,
    l2: Sequence[float] | None = None,
    input_stats: tuple[np.ndarray, np.ndarray] | None = None,
    name: str = "resnet",
) -> keras.Model:
    """The `arch` family's features ("dense" or "conv"), then the softmax classifier.

    `blocks` is one count for every width or one per width. Dense only: `l2` holds one factor
    per transition Dense (None: no L2), `dropout` follows every transition Dense (0: none).
    Conv only: `stem` and `downsample`. `input_stats`, the per-channel (mean, variance) of the
    training images, adds a first layer that standardizes the input, saved with the model.
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
        x = conv_features(x, widths, blocks, stem, downsample, activation, norm, prenorm)
    else:
        x = dense_features(x, widths, blocks, expansion, activation, norm, prenorm, dropout, l2)
    # float32 probabilities even under mixed precision, for a stable loss.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)
