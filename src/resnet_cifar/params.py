"""Reads params.yaml and validates it; every error names the params.yaml key at fault.

Each key of a variant is declared once, as a field of `VariantSpec` with the check that
validates it; its default is the value under `train:` in params.yaml.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from resnet_cifar.paths import PARAMS_FILE
from resnet_cifar.stage import StageError

TOP_LEVEL_KEYS = ("seed", "data", "train", "variants")
DATASETS = ("cifar10", "cifar100")
LABEL_MODES = ("fine", "coarse")
PER_WIDTH_KEYS = ("blocks", "l2")  # one value for all widths, or a list of exactly one per width
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}  # Keras backend: what installs it


class ParamsError(StageError):
    """A missing, unknown or out-of-range value in params.yaml."""


def _fail(key: str, expected: str, got: Any) -> None:
    raise ParamsError(f"params.yaml: {key}: expected {expected}, got {got!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Checks: each takes (value, params.yaml path) and returns the value as the spec holds it.
Check = Callable[[Any, str], Any]


def positive_int(value: Any, where: str) -> int:
    if not _is_int(value) or value <= 0:
        _fail(where, "a positive integer", value)
    return value


def int_in(low: int, high: int, expected: str) -> Check:
    def check(value: Any, where: str) -> int:
        if not _is_int(value) or not low <= value < high:
            _fail(where, expected, value)
        return value
    return check


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def choice(*options: str) -> Check:
    def check(value: Any, where: str) -> str:
        if value not in options:
            _fail(where, "one of " + ", ".join(options), value)
        return value
    return check


def number(low: float, high: float = float("inf"), low_open: bool = False, high_open: bool = False) -> Check:
    left, right = "(" if low_open else "[", ")" if high_open or high == float("inf") else "]"
    expected = f"a number in {left}{low:g}, {high:g}{right}"

    def check(value: Any, where: str) -> float:
        in_range = _is_number(value) and (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high)
        if not in_range:
            _fail(where, expected, value)
        return float(value)
    return check


def check_widths(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        _fail(where, "a non-empty list of layer widths", value)
    for i, width in enumerate(value):
        if not _is_int(width) or width <= 0:
            _fail(f"{where}[{i}]", "a positive integer width", width)
    return tuple(value)


def per_width(check: Check) -> Check:
    """One value for every width, or a list of one value per width (its length is checked
    against `widths` once both are known)."""
    def check_each(value: Any, where: str) -> tuple:
        if isinstance(value, list):
            return tuple(check(item, f"{where}[{i}]") for i, item in enumerate(value))
        return (check(value, where),)
    return check_each


def check_blocks(value: Any, where: str) -> tuple[int, ...]:
    """Residual blocks per stage: one positive number for every stage, or a list (0: none)."""
    if isinstance(value, list):
        return tuple(int_in(0, 1000, "an integer >= 0")(count, f"{where}[{i}]") for i, count in enumerate(value))
    return (positive_int(value, where),)


def choice_or_boolean(*options: str) -> Check:
    """true, false, or one of `options`."""
    def check(value: Any, where: str) -> bool | str:
        if not isinstance(value, bool) and value not in options:
            _fail(where, "true, false or " + ", ".join(options), value)
        return value
    return check


def check_stem(value: Any, where: str) -> int | str:
    """The filters of the stem convolution, or `whiten` (the fixed patch-whitening layer)."""
    if value != "whiten" and (not _is_int(value) or value <= 0):
        _fail(where, "a positive number of filters, or whiten", value)
    return value


def check_validation(value: Any, where: str) -> str | float:
    if value == "test":
        return value
    if not _is_number(value) or not 0 < value < 1:
        _fail(where, "'test' or a fraction in (0, 1) of train to hold out", value)
    return float(value)


def check_devices(value: Any, where: str) -> str | tuple[int, ...]:
    """`auto` (every visible GPU, else the CPU), `cpu`, or the indices of the GPUs to use."""
    if value in ("auto", "cpu"):
        return value
    if (not isinstance(value, list) or not value or len(set(value)) != len(value)
            or not all(_is_int(index) and index >= 0 for index in value)):
        _fail(where, "auto, cpu or a list of distinct GPU indices", value)
    return tuple(value)


def key(check: Check) -> Any:
    return field(metadata={"check": check})


@dataclass(frozen=True)
class VariantSpec:
    """One model variant: the shared `train` defaults with the variant's overrides applied."""

    name: str
    seed: int
    # the network (models.Network: build_model's)
    arch: str = key(choice("dense", "conv"))
    widths: tuple[int, ...] = key(check_widths)  # dense: units per stage; conv: filters per stage
    blocks: tuple[int, ...] = key(check_blocks)  # residual blocks per stage
    stem: int | str = key(check_stem)  # conv: filters of the stem convolution, or "whiten"
    downsample: str = key(choice("stride", "pool", "pool_first"))  # conv: how a stage halves the image
    conv_init: str = key(choice("he", "dirac"))  # conv: dirac starts filters as the identity
    norm_momentum: float = key(number(0.0, 1.0, high_open=True))  # batch norm's moving statistics
    norm_scale: bool = key(boolean)  # batch norm learns a scale (false: its offset alone)
    expansion: float = key(number(0.0, low_open=True))  # dense: a block's hidden width factor
    activation: str = key(choice("relu", "gelu"))
    norm: str = key(choice("none", "layer", "batch"))
    prenorm: bool = key(boolean)  # x + f(norm(x)) blocks (pre-activation, for conv)
    shortcuts: bool = key(boolean)  # conv: residual blocks; false: plain conv -> norm -> act blocks
    head_pool: str = key(choice("average", "max"))  # conv: global pooling before the classifier
    dropout: float = key(number(0.0, 1.0, high_open=True))  # dense: after each transition
    l2: tuple[float, ...] = key(per_width(number(0.0)))  # dense: one factor per transition
    logit_scale: float = key(number(0.0, low_open=True))  # the classifier's logits times this
    standardize: bool = key(boolean)  # per-channel, with the training images' mean and std
    # the input it sees (standardization: a layer of the network)
    flip: bool | str = key(choice_or_boolean("alternate"))  # true: random; alternate: by epoch
    translate: int = key(int_in(0, 16, "an integer number of pixels in [0, 16)"))  # zero-filled
    crop: int = key(int_in(0, 16, "an integer number of pixels in [0, 16)"))  # reflect-padded
    mixup: float = key(number(0.0))  # Beta(mixup, mixup) mixing weights; 0: off
    # the optimization
    epochs: int = key(positive_int)
    batch_size: int = key(positive_int)
    optimizer: str = key(choice("adam", "adamw", "lion", "sgd", "nesterov", "muon"))
    learning_rate: float = key(number(0.0, low_open=True))  # the peak, after warm-up
    norm_lr_factor: float = key(number(0.0, low_open=True))  # sgd: the norm layers' learning rate factor
    muon_lr_factor: float = key(number(0.0, low_open=True))  # muon: the convolution filters' learning rate factor
    momentum: float = key(number(0.0, 1.0, high_open=True))  # nesterov, muon: SGD's Nesterov momentum
    weight_decay: float = key(number(0.0))  # decoupled: w -= lr * weight_decay * w
    warmup_epochs: int = key(int_in(0, 1_000_000, "an integer in [0, epochs)"))
    warmup_from: float = key(number(0.0, 1.0, high_open=True))  # the warm-up's first rate, a fraction of learning_rate
    schedule: str = key(choice("constant", "cosine", "linear"))
    label_smoothing: float = key(number(0.0, 1.0, high_open=True))
    ema: float = key(number(0.0, 1.0, high_open=True))  # momentum of the weight average
    lookahead: bool = key(boolean)  # sgd, nesterov, muon: airbench94's lookahead, ending on the slow weights
    whiten_bias_epochs: int = key(int_in(0, 1_000_000, "an integer in [0, epochs)"))  # the whitening bias learns for these (0: throughout)
    precision: str = key(choice("auto", "float32", "bfloat16", "float16"))
    xla: bool | str = key(choice_or_boolean("auto"))  # compile the training step with XLA; auto: runtime.resolve_xla
    devices: str | tuple[int, ...] = key(check_devices)  # several: synchronous data parallel
    validation: str | float = key(check_validation)  # "test", or the fraction of train held out
    # the evaluation
    tta: bool | str = key(choice_or_boolean("shifts"))  # true: the image and its mirror; shifts: and 1-pixel shifts


VARIANT_KEYS = tuple(f.name for f in fields(VariantSpec) if f.metadata)
# widths are each variant's own; max_epochs caps every variant's epochs (a short check, such as a
# pull request's), and backend is the one Keras backend of every stage (Keras picks it once, when
# imported), so those two are the shared section's alone.
TRAIN_KEYS = tuple(name for name in VARIANT_KEYS if name != "widths") + ("max_epochs", "backend")
WEIGHT_DECAY_OPTIMIZERS = ("adamw", "lion", "sgd", "nesterov", "muon")
SGD_OPTIMIZERS = ("sgd", "nesterov", "muon")
NESTEROV_OPTIMIZERS = ("nesterov", "muon")  # the momentum key's
DENSE_ONLY = {"expansion": 1.0, "dropout": 0.0}  # and l2: each with its value that means "off"


@dataclass(frozen=True)
class DataParams:
    dataset: str
    label_mode: str


def load_params(path: Path = PARAMS_FILE) -> dict:
    """The parsed params file, with its top-level keys checked."""
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run the stages from the project root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    _check_keys(params, TOP_LEVEL_KEYS, TOP_LEVEL_KEYS, where="")
    if not _is_int(params["seed"]) or params["seed"] < 0:
        _fail("seed", "an integer >= 0", params["seed"])
    return params


def data_params(params: dict) -> DataParams:
    """The validated `data` section."""
    section = _section(params, "data")
    _check_keys(section, ("dataset", "label_mode"), ("dataset", "label_mode"), where="data")
    dataset = choice(*DATASETS)(section["dataset"], "data.dataset")
    label_mode = choice(*LABEL_MODES)(section["label_mode"], "data.label_mode")
    if label_mode == "coarse" and dataset != "cifar100":
        _fail("data.label_mode", "'fine' for cifar10 (only cifar100 has coarse labels)", label_mode)
    return DataParams(dataset, label_mode)


def variant_names(params: dict) -> list[str]:
    variants = _section(params, "variants")
    if not variants:
        raise ParamsError("params.yaml: variants: expected at least one variant")
    return list(variants)


def train_defaults(params: dict) -> dict:
    """The validated-for-shape `train` section: every key but widths, each once."""
    defaults = _section(params, "train")
    _check_keys(defaults, TRAIN_KEYS, TRAIN_KEYS, where="train")
    return defaults


def backend(params: dict) -> str:
    """The validated train.backend: the Keras backend the train and evaluate stages run on."""
    return choice(*BACKENDS)(train_defaults(params)["backend"], "train.backend")


def variant_spec(params: dict, name: str) -> VariantSpec:
    """The validated spec of variant `name`: `train` defaults overridden by `variants.<name>`."""
    defaults = train_defaults(params)
    variants = _section(params, "variants")
    if name not in variants:
        raise ParamsError(f"params.yaml: variants.{name}: no such variant (have: {', '.join(variants)})")
    overrides = variants[name] or {}
    if not isinstance(overrides, dict):
        _fail(f"variants.{name}", "a mapping of overrides", overrides)
    _check_keys(overrides, VARIANT_KEYS, ("widths",), where=f"variants.{name}")

    where = {k: f"variants.{name}.{k}" if k in overrides else f"train.{k}" for k in VARIANT_KEYS}
    merged = {**defaults, **overrides}
    values = {f.name: f.metadata["check"](merged[f.name], where[f.name]) for f in fields(VariantSpec) if f.metadata}
    n = len(values["widths"])
    for per_stage in PER_WIDTH_KEYS:
        if len(values[per_stage]) == 1:
            values[per_stage] *= n
        elif len(values[per_stage]) != n:
            raise ParamsError(f"params.yaml: {where[per_stage]}: expected {n} values (one per width), "
                              f"got {len(values[per_stage])}")
    if values["warmup_epochs"] >= values["epochs"]:
        _fail(where["warmup_epochs"], f"an integer in [0, epochs) = [0, {values['epochs']})",
              values["warmup_epochs"])
    if values["weight_decay"] and values["optimizer"] not in WEIGHT_DECAY_OPTIMIZERS:
        _fail(where["weight_decay"], f"0 with optimizer {values['optimizer']} (its weight decay is decoupled: "
              f"{', '.join(WEIGHT_DECAY_OPTIMIZERS)})", values["weight_decay"])
    if values["norm_lr_factor"] != 1 and values["optimizer"] not in SGD_OPTIMIZERS:
        _fail(where["norm_lr_factor"], f"1 with optimizer {values['optimizer']} (the factor is sgd's, nesterov's and muon's)",
              values["norm_lr_factor"])
    for sgd_key, off in (("lookahead", False), ("whiten_bias_epochs", 0)):
        if values[sgd_key] != off and values["optimizer"] not in SGD_OPTIMIZERS:
            _fail(where[sgd_key], f"{str(off).lower()} with optimizer {values['optimizer']} (a key of "
                  f"{', '.join(SGD_OPTIMIZERS)})", values[sgd_key])
    if values["whiten_bias_epochs"] and values["stem"] != "whiten":
        _fail(where["whiten_bias_epochs"], f"0 with stem {values['stem']} (the whitening layer's key)",
              values["whiten_bias_epochs"])
    if values["whiten_bias_epochs"] >= values["epochs"]:
        _fail(where["whiten_bias_epochs"], f"an integer in [0, epochs) = [0, {values['epochs']})",
              values["whiten_bias_epochs"])
    if values["muon_lr_factor"] != 1 and values["optimizer"] != "muon":
        _fail(where["muon_lr_factor"], f"1 with optimizer {values['optimizer']} (the factor is muon's)",
              values["muon_lr_factor"])
    if "momentum" in overrides and values["optimizer"] not in NESTEROV_OPTIMIZERS:
        _fail(where["momentum"], f"no momentum with optimizer {values['optimizer']} (a key of "
              f"{', '.join(NESTEROV_OPTIMIZERS)})", values["momentum"])
    if values["warmup_from"] and not values["warmup_epochs"]:
        _fail(where["warmup_from"], "0 without a warm-up (warmup_epochs 0)", values["warmup_from"])
    if not values["shortcuts"] and values["prenorm"]:
        _fail(where["shortcuts"], "true with prenorm true (pre-activation blocks are residual)", values["shortcuts"])
    if values["optimizer"] == "muon" and values["arch"] != "conv":
        _fail(where["optimizer"], "one of adam, adamw, lion, sgd, nesterov with arch dense (muon trains "
              "convolution filters)", values["optimizer"])
    if values["arch"] == "conv":
        for dense_key, off in {**DENSE_ONLY, "l2": (0.0,) * n}.items():
            if values[dense_key] != off:
                _fail(where[dense_key], f"{off} with arch conv (a dense network's key)", values[dense_key])
    if defaults["max_epochs"] is not None:
        cap = positive_int(defaults["max_epochs"], "train.max_epochs")
        if values["epochs"] > cap:  # the run is shortened as a whole: its warm-up too, and its decay ends at the cap
            values["epochs"], values["warmup_epochs"] = cap, min(values["warmup_epochs"], cap - 1)
    return VariantSpec(name=name, seed=params["seed"], **values)


def _section(params: dict, key: str) -> dict:
    section = params[key]
    if not isinstance(section, dict):
        _fail(key, "a mapping", section)
    return section


def _check_keys(section: dict, allowed: tuple, required: tuple, where: str) -> None:
    prefix = f"{where}." if where else ""
    for name in section:
        if name not in allowed:
            raise ParamsError(
                f"params.yaml: {prefix}{name}: unknown key (expected one of: {', '.join(allowed)})"
            )
    for name in required:
        if name not in section:
            raise ParamsError(f"params.yaml: {prefix}{name}: missing")
