"""Dense residual networks, as in the assignment.

    Flatten -> [Dense(w, relu) -> (Dropout) -> residual_block(w)] for each width w -> Dense(classes, softmax)

A residual block computes relu(Dense(units)(Dense(units, relu)(x)) + x): the activation comes
after the sum, so the block's input must already have `units` features, which the transition
Dense before it guarantees.
"""

from collections.abc import Sequence

import keras
from keras import layers, regularizers


def residual_block(x, units: int, name: str = "block"):
    """a1 = Dense(units, relu)(x); z2 = Dense(units)(a1); return relu(z2 + x).

    Works on a symbolic Keras tensor (to build a model) and on a concrete array alike.
    """
    a1 = layers.Dense(units, activation="relu", name=f"{name}_dense1")(x)
    z2 = layers.Dense(units, name=f"{name}_dense2")(a1)
    summed = layers.Add(name=f"{name}_add")([z2, x])
    return layers.Activation("relu", name=f"{name}_out")(summed)


def transition(x, units: int, l2: float, dropout: float, name: str):
    """Dense(units, relu) with optional L2 on its kernel, then optional Dropout."""
    x = layers.Dense(
        units,
        activation="relu",
        kernel_regularizer=regularizers.L2(l2) if l2 else None,
        name=f"{name}_dense",
    )(x)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def build_model(
    widths: Sequence[int],
    num_classes: int,
    input_shape: Sequence[int] = (32, 32, 3),
    dropout: float = 0.0,
    l2: Sequence[float] | None = None,
    name: str = "dense_resnet",
) -> keras.Model:
    """The assignment's network: one transition Dense and one residual block per width.

    `l2` holds one factor per transition Dense (None: no L2); `dropout` follows every
    transition Dense (0: none).
    """
    l2 = tuple(l2) if l2 is not None else (0.0,) * len(widths)
    if len(l2) != len(widths):
        raise ValueError(f"l2: expected {len(widths)} factors (one per width), got {len(l2)}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Flatten(name="flatten")(inputs)
    for stage, (units, factor) in enumerate(zip(widths, l2), start=1):
        x = transition(x, units, factor, dropout, name=f"stage{stage}")
        x = residual_block(x, units, name=f"stage{stage}_block")
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)
