"""Dense residual networks: the assignment's, and the same family with modern ingredients.

    Flatten -> [transition(w) -> residual_block(w) x blocks] for each width w -> Dense(classes, softmax)

The assignment's residual block computes act(Dense(units)(Dense(units, act)(x)) + x): the
activation comes after the sum, so the block's input must already have `units` features, which
the transition Dense before it guarantees. With the defaults (one block per width, expansion 1,
relu, no normalization) `build_model` is exactly the assignment's network.
"""

from collections.abc import Sequence

import keras
from keras import layers, regularizers


def normalization(kind: str, name: str) -> layers.Layer:
    """A LayerNormalization ("layer") or BatchNormalization ("batch") layer."""
    if kind == "layer":
        return layers.LayerNormalization(name=name)
    return layers.BatchNormalization(name=name)


def dense(x, units: int, activation: str | None, norm: str, name: str, **dense_kwargs):
    """Dense(units, activation), or Dense -> norm -> activation when norm is not "none"."""
    if norm == "none":
        return layers.Dense(units, activation=activation, name=name, **dense_kwargs)(x)
    x = layers.Dense(units, name=name, **dense_kwargs)(x)
    x = normalization(norm, name=f"{name}_norm")(x)
    return layers.Activation(activation, name=f"{name}_act")(x) if activation else x


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
    h = x if norm == "none" else normalization(norm, name=f"{name}_norm")(x)
    h = layers.Dense(hidden, activation=activation, name=f"{name}_dense1")(h)
    h = layers.Dense(units, name=f"{name}_dense2")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def transition(x, units: int, l2: float, dropout: float, activation: str, norm: str, name: str):
    """Dense(units, act) with optional L2 on its kernel and a norm, then optional Dropout."""
    x = dense(x, units, activation, norm, name=f"{name}_dense",
              kernel_regularizer=regularizers.L2(l2) if l2 else None)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def build_model(
    widths: Sequence[int],
    num_classes: int,
    input_shape: Sequence[int] = (32, 32, 3),
    blocks: int = 1,
    expansion: float = 1.0,
    activation: str = "relu",
    norm: str = "none",
    prenorm: bool = False,
    dropout: float = 0.0,
    l2: Sequence[float] | None = None,
    name: str = "dense_resnet",
) -> keras.Model:
    """One transition Dense and `blocks` residual blocks per width, then the classifier.

    `l2` holds one factor per transition Dense (None: no L2); `dropout` follows every transition
    Dense (0: none). With `prenorm`, blocks are prenorm_block, the transitions are not
    normalized, and the norm is applied once more before the classifier.
    """
    l2 = tuple(l2) if l2 is not None else (0.0,) * len(widths)
    if len(l2) != len(widths):
        raise ValueError(f"l2: expected {len(widths)} factors (one per width), got {len(l2)}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Flatten(name="flatten")(inputs)
    for stage, (units, factor) in enumerate(zip(widths, l2), start=1):
        x = transition(x, units, factor, dropout, activation, "none" if prenorm else norm,
                       name=f"stage{stage}")
        hidden = max(1, round(expansion * units))
        for block in range(1, blocks + 1):
            # The assignment's single block per width keeps its original name.
            block_name = f"stage{stage}_block" + (f"{block}" if blocks > 1 else "")
            if prenorm:
                x = prenorm_block(x, units, hidden, activation, norm, name=block_name)
            else:
                x = residual_block(x, units, hidden, activation, norm, name=block_name)
    if prenorm and norm != "none":
        x = normalization(norm, name="final_norm")(x)
    # float32 probabilities even under mixed precision, for a stable loss.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)
