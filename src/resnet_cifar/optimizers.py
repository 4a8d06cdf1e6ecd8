"""The train stage's optimizers and learning-rate schedule, in Keras alone (the same on every
backend): Adam, AdamW, Lion or SGD (plain or Nesterov, with a larger step for the norm layers'
weights; or Muon for the convolution filters, a whitening bias that stops learning, lookahead),
decoupled weight decay, an average of the weights, and a linear warm-up followed by constant,
cosine or linear decay.
"""

import math

import keras
from keras import ops

from resnet_cifar.models import PatchWhitening
from resnet_cifar.params import VariantSpec

# optimizer `muon`, as airbench94_muon trains its filters: Nesterov momentum 0.6, and 3 steps of
# the quintic Newton-Schulz iteration whose coefficients maximize its slope at zero (it maps the
# singular values to about 0.5-1.5 rather than exactly 1, which trains as well, in fewer steps).
MUON_MOMENTUM = 0.6
NEWTON_SCHULZ_STEPS = 3
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# `lookahead`, as airbench94 has it: every 5 steps, the slow weights move toward the weights
# (decay 0.95^5, scaled by the cube of the run's progress) and the weights are set to them.
LOOKAHEAD_EVERY = 5
LOOKAHEAD_DECAY = 0.95 ** 5


@keras.saving.register_keras_serializable(package="resnet_cifar")
class WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `start` x `peak` to `peak` over `warmup_steps`, then constant, cosine or
    linear decay to 0 at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str, start: float = 0.0):
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay
        self.start = start

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.start + (1 - self.start) * step / max(self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1)
        after = {"constant": ops.ones_like(progress), "cosine": 0.5 * (1 + ops.cos(math.pi * progress)),
                 "linear": 1 - progress}[self.decay]
        return self.peak * ops.where(step < self.warmup_steps, warmup, after)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "decay": self.decay, "start": self.start}


def learning_rate(spec: VariantSpec, steps_per_epoch: int) -> float | WarmupThenDecay:
    """The constant rate, or a linear warm-up to it, then constant, cosine or linear decay to 0."""
    if spec.schedule == "constant" and not spec.warmup_epochs:
        return spec.learning_rate
    return WarmupThenDecay(spec.learning_rate, spec.warmup_epochs * steps_per_epoch,
                           spec.epochs * steps_per_epoch, spec.schedule, spec.warmup_from)


def orthogonalized(matrix):
    """About the nearest semi-orthogonal matrix to `matrix` (U V^T of its SVD U S V^T, with the
    singular values only brought near 1): the Newton-Schulz iteration, on the wide orientation."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = ops.transpose(matrix) if tall else matrix
    x = x / (ops.norm(x) + 1e-7)  # every singular value at most 1, where the iteration converges
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = ops.matmul(x, ops.transpose(x))
        x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
    return ops.transpose(x) if tall else x


@keras.saving.register_keras_serializable(package="resnet_cifar")
class SGD(keras.optimizers.SGD):
    """Keras's SGD, whose steps for the weights at `boosted_paths` (the norm layers' offsets and
    scales) are `factor` times larger (airbench's 64: batch norm's offsets learn slowly otherwise);
    their weight decay stays the other weights'. With `muon_paths` (convolution filters), those
    take Muon's steps instead (`muon_step`), `muon_factor` times the learning rate. The weights at
    `frozen_paths` stop changing after `frozen_after` steps. With `lookahead_total` (the steps of
    the whole run), lookahead (`lookahead`)."""

    def __init__(self, factor: float = 1.0, boosted_paths: tuple[str, ...] = (), *, muon_factor: float = 1.0,
                 muon_paths: tuple[str, ...] = (), frozen_paths: tuple[str, ...] = (), frozen_after: int = 0,
                 lookahead_total: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.factor, self.boosted_paths = factor, tuple(boosted_paths)
        self.muon_factor, self.muon_paths = muon_factor, tuple(muon_paths)
        self.frozen_paths, self.frozen_after = tuple(frozen_paths), frozen_after
        self.lookahead_total = lookahead_total

    def build(self, variables):
        super().build(variables)
        self.boosted = [variable.path in self.boosted_paths for variable in variables]
        self.muon = [variable.path in self.muon_paths for variable in variables]
        if self.lookahead_total:
            self.slow_weights = self.add_optimizer_variables(variables, "slow")
            for variable, slow in zip(variables, self.slow_weights):
                slow.assign(variable)

    def apply(self, grads, trainable_variables=None):
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        held = [(variable, ops.copy(variable.value)) for variable in variables if variable.path in self.frozen_paths]
        super().apply(grads, trainable_variables)
        for variable, value in held:  # its step, momentum and weight decay undone, once frozen
            variable.assign(ops.where(self.iterations.value > self.frozen_after, value, variable.value))
        if self.lookahead_total:
            self.lookahead(variables)

    def lookahead(self, variables):
        """airbench94's lookahead: every LOOKAHEAD_EVERY steps the slow weights move toward the
        weights by 1 - decay, decay = LOOKAHEAD_DECAY x (step / total steps)^3, and the weights
        are set to them (the run ends on them: finalize_variable_values)."""
        step = self.iterations.value
        due = ops.equal(step % LOOKAHEAD_EVERY, 0)
        decay = LOOKAHEAD_DECAY * (ops.cast(step, "float32") / self.lookahead_total) ** 3
        for variable in variables:
            slow = self.slow_weights[self._get_variable_index(variable)]
            moved = slow.value + (1 - ops.cast(decay, slow.dtype)) * (variable.value - slow.value)
            slow.assign(ops.where(due, moved, slow.value))
            variable.assign(ops.where(due, slow.value, variable.value))

    def finalize_variable_values(self, var_list):
        super().finalize_variable_values(var_list)
        if self.lookahead_total:
            for variable in var_list:
                variable.assign(self.slow_weights[self._get_variable_index(variable)])

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        if self.muon[index]:
            # Its momentum (Muon's own) in SGD's slot for the variable, which SGD leaves unused then.
            self.muon_step(gradient, variable, learning_rate * self.muon_factor, self.momentums[index])
            return
        if self.boosted[index]:
            learning_rate = learning_rate * self.factor
        super().update_step(gradient, variable, learning_rate)

    def muon_step(self, gradient, variable, learning_rate, momentum):
        """Muon (Jordan et al. 2024), as airbench94_muon applies it to a filter bank: Nesterov
        momentum, the weights rescaled to a norm of sqrt(filters) (so that weight decay has nothing
        to do), then a step along the orthogonalized update of the bank as a matrix (one row per
        filter; the order of its columns does not change the result)."""
        gradient = ops.cast(gradient, variable.dtype)
        self.assign(momentum, MUON_MOMENTUM * momentum + gradient)
        update = gradient + MUON_MOMENTUM * momentum
        filters = variable.shape[-1]
        self.assign(variable, variable * (filters ** 0.5 / ops.norm(ops.reshape(variable, (-1,)))))
        step = ops.reshape(orthogonalized(ops.reshape(update, (-1, filters))), variable.shape)
        self.assign_sub(variable, ops.cast(learning_rate, variable.dtype) * step)

    def get_config(self):
        return super().get_config() | {"factor": self.factor, "boosted_paths": list(self.boosted_paths),
                                       "muon_factor": self.muon_factor, "muon_paths": list(self.muon_paths),
                                       "frozen_paths": list(self.frozen_paths), "frozen_after": self.frozen_after,
                                       "lookahead_total": self.lookahead_total}


def norm_weight_paths(model: keras.Model) -> tuple[str, ...]:
    """The paths of the trainable weights of the model's normalization layers."""
    norms = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
    return tuple(weight.path for layer in model.layers if isinstance(layer, norms) for weight in layer.trainable_weights)


def filter_paths(model: keras.Model) -> tuple[str, ...]:
    """The paths of the model's trainable convolution filters (4-D kernels)."""
    return tuple(weight.path for weight in model.trainable_weights if len(weight.shape) == 4)


def whitening_bias_paths(model: keras.Model) -> tuple[str, ...]:
    """The path of the patch-whitening layer's bias, where the model has one."""
    return tuple(layer.bias.path for layer in model.layers if isinstance(layer, PatchWhitening))


def optimizer(spec: VariantSpec, steps_per_epoch: int, model: keras.Model) -> keras.optimizers.Optimizer:
    """The variant's optimizer for `model`; weight decay is decoupled (Keras's), EMA is Keras's
    weight average. The SGD family's steps for the norm weights are norm_lr_factor times larger;
    muon's for the convolution filters are Muon's, at muon_lr_factor times the rate (Nesterov
    SGD's for the rest); the whitening bias stops learning after whiten_bias_epochs; lookahead."""
    common = {"learning_rate": learning_rate(spec, steps_per_epoch), "weight_decay": spec.weight_decay or None}
    if spec.ema:  # the model ends training with the averaged weights
        common |= {"use_ema": True, "ema_momentum": spec.ema}
    if spec.optimizer == "adamw":
        return keras.optimizers.AdamW(**common)
    if spec.optimizer == "adam":
        return keras.optimizers.Adam(**common)
    if spec.optimizer == "lion":  # Chen et al. 2023: the sign of a momentum; Bachmann et al.'s MLPs train with it
        return keras.optimizers.Lion(**common)
    common |= {"lookahead_total": spec.epochs * steps_per_epoch if spec.lookahead else 0,
               "frozen_paths": whitening_bias_paths(model) if spec.whiten_bias_epochs else (),
               "frozen_after": spec.whiten_bias_epochs * steps_per_epoch}
    if spec.optimizer == "sgd":
        return SGD(spec.norm_lr_factor, norm_weight_paths(model), **common)
    if spec.optimizer == "muon":
        common |= {"muon_factor": spec.muon_lr_factor, "muon_paths": filter_paths(model)}
    return SGD(spec.norm_lr_factor, norm_weight_paths(model), momentum=spec.momentum, nesterov=True, **common)
