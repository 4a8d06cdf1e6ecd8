"""Reads params.yaml and validates it; every error names the params.yaml key at fault."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from resnet_cifar.stage import StageError

PARAMS_FILE = Path("params.yaml")
TOP_LEVEL_KEYS = ("seed", "data", "train", "variants")
DATASETS = ("cifar10", "cifar100")
LABEL_MODES = ("fine", "coarse")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "float32", "bfloat16")
ACTIVATIONS = ("relu", "gelu")
NORMS = ("none", "layer", "batch")


class ParamsError(StageError):
    """A missing, unknown or out-of-range value in params.yaml."""


@dataclass(frozen=True)
class DataParams:
    dataset: str
    label_mode: str


@dataclass(frozen=True)
class VariantSpec:
    """One model variant: the shared `train` defaults with the variant's overrides applied."""

    name: str
    seed: int
    # the network
    widths: tuple[int, ...]
    blocks: int  # residual blocks per width
    expansion: float  # a block's first Dense has round(expansion * width) units
    activation: str
    norm: str  # none | layer | batch
    prenorm: bool  # block x + f(norm(x)) instead of act(f(x) + x)
    dropout: float
    l2: tuple[float, ...]  # one factor per transition Dense
    # the data it sees
    flip: bool
    translate: int  # pixels
    mixup: float  # Beta(mixup, mixup) mixing weights; 0: off
    # the optimization
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float  # the peak, after warm-up
    weight_decay: float  # adamw's decoupled weight decay
    warmup_epochs: int
    schedule: str  # constant | cosine
    label_smoothing: float
    precision: str  # auto | float32 | bfloat16
    validation: str | float  # "test", or the fraction of train held out


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
    seed = params["seed"]
    if not _is_int(seed) or seed < 0:
        _fail("seed", "an integer >= 0", seed)
    return params


def data_params(params: dict) -> DataParams:
    """The validated `data` section."""
    section = _section(params, "data")
    _check_keys(section, ("dataset", "label_mode"), ("dataset", "label_mode"), where="data")
    dataset = _choice(section["dataset"], DATASETS, "data.dataset")
    label_mode = _choice(section["label_mode"], LABEL_MODES, "data.label_mode")
    if label_mode == "coarse" and dataset != "cifar100":
        _fail("data.label_mode", "'fine' for cifar10 (only cifar100 has coarse labels)", label_mode)
    return DataParams(dataset, label_mode)


TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "learning_rate", "weight_decay", "warmup_epochs",
              "schedule", "label_smoothing", "precision", "validation",
              "blocks", "expansion", "activation", "norm", "prenorm", "dropout", "l2",
              "flip", "translate", "mixup")
VARIANT_KEYS = ("widths",) + TRAIN_KEYS


def variant_names(params: dict) -> list[str]:
    variants = _section(params, "variants")
    if not variants:
        raise ParamsError("params.yaml: variants: expected at least one variant")
    return list(variants)


def variant_spec(params: dict, name: str) -> VariantSpec:
    """The validated spec of variant `name`: `train` defaults overridden by `variants.<name>`."""
    defaults = _section(params, "train")
    _check_keys(defaults, TRAIN_KEYS, TRAIN_KEYS, where="train")
    variants = _section(params, "variants")
    if name not in variants:
        raise ParamsError(f"params.yaml: variants.{name}: no such variant (have: {', '.join(variants)})")
    overrides = variants[name] or {}
    if not isinstance(overrides, dict):
        _fail(f"variants.{name}", "a mapping of overrides", overrides)
    _check_keys(overrides, VARIANT_KEYS, ("widths",), where=f"variants.{name}")

    def value(key: str) -> tuple[Any, str]:
        """The effective value of `key` and the params.yaml path it came from."""
        if key in overrides:
            return overrides[key], f"variants.{name}.{key}"
        return defaults[key], f"train.{key}"

    widths, where = value("widths")
    if not isinstance(widths, list) or not widths:
        _fail(where, "a non-empty list of layer widths", widths)
    for i, width in enumerate(widths):
        if not _is_int(width) or width <= 0:
            _fail(f"{where}[{i}]", "a positive integer width", width)

    dropout, where = value("dropout")
    _number(dropout, where, low=0.0, high=1.0, high_open=True)

    l2, where = value("l2")
    l2_factors = tuple(l2) if isinstance(l2, list) else (l2,) * len(widths)
    if len(l2_factors) != len(widths):
        raise ParamsError(
            f"params.yaml: {where}: expected {len(widths)} values (one per width), got {len(l2_factors)}"
        )
    for i, factor in enumerate(l2_factors):
        _number(factor, f"{where}[{i}]" if isinstance(l2, list) else where, low=0.0)

    blocks, where = value("blocks")
    _positive_int(blocks, where)
    expansion, where = value("expansion")
    _number(expansion, where, low=0.0, low_open=True)
    activation, where = value("activation")
    _choice(activation, ACTIVATIONS, where)
    norm, where = value("norm")
    _choice(norm, NORMS, where)
    prenorm, where = value("prenorm")
    _boolean(prenorm, where)

    flip, where = value("flip")
    _boolean(flip, where)
    translate, where = value("translate")
    if not _is_int(translate) or not 0 <= translate < 16:
        _fail(where, "an integer number of pixels in [0, 16)", translate)
    mixup, where = value("mixup")
    _number(mixup, where, low=0.0)

    epochs, where = value("epochs")
    _positive_int(epochs, where)
    batch_size, where = value("batch_size")
    _positive_int(batch_size, where)
    optimizer, where = value("optimizer")
    _choice(optimizer, OPTIMIZERS, where)
    learning_rate, where = value("learning_rate")
    _number(learning_rate, where, low=0.0, low_open=True)
    weight_decay, where = value("weight_decay")
    _number(weight_decay, where, low=0.0)
    if weight_decay and optimizer != "adamw":
        _fail(where, f"0 with optimizer {optimizer} (weight decay is adamw's)", weight_decay)
    warmup_epochs, where = value("warmup_epochs")
    if not _is_int(warmup_epochs) or not 0 <= warmup_epochs < epochs:
        _fail(where, f"an integer in [0, epochs) = [0, {epochs})", warmup_epochs)
    schedule, where = value("schedule")
    _choice(schedule, SCHEDULES, where)
    label_smoothing, where = value("label_smoothing")
    _number(label_smoothing, where, low=0.0, high=1.0, high_open=True)
    precision, where = value("precision")
    _choice(precision, PRECISIONS, where)
    validation, where = value("validation")
    if validation != "test":
        _number(validation, where, low=0.0, high=1.0, low_open=True, high_open=True,
                expected="'test' or a fraction in (0, 1) of train to hold out")

    return VariantSpec(
        name=name,
        seed=params["seed"],
        widths=tuple(widths),
        blocks=blocks,
        expansion=float(expansion),
        activation=activation,
        norm=norm,
        prenorm=prenorm,
        dropout=float(dropout),
        l2=tuple(float(f) for f in l2_factors),
        flip=flip,
        translate=translate,
        mixup=float(mixup),
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        learning_rate=float(learning_rate),
        weight_decay=float(weight_decay),
        warmup_epochs=warmup_epochs,
        schedule=schedule,
        label_smoothing=float(label_smoothing),
        precision=precision,
        validation=validation if validation == "test" else float(validation),
    )


def _section(params: dict, key: str) -> dict:
    section = params[key]
    if not isinstance(section, dict):
        _fail(key, "a mapping", section)
    return section


def _check_keys(section: dict, allowed: tuple, required: tuple, where: str) -> None:
    prefix = f"{where}." if where else ""
    for key in section:
        if key not in allowed:
            raise ParamsError(
                f"params.yaml: {prefix}{key}: unknown key (expected one of: {', '.join(allowed)})"
            )
    for key in required:
        if key not in section:
            raise ParamsError(f"params.yaml: {prefix}{key}: missing")


def _fail(key: str, expected: str, got: Any) -> None:
    raise ParamsError(f"params.yaml: {key}: expected {expected}, got {got!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any, key: str) -> None:
    if not _is_int(value) or value <= 0:
        _fail(key, "a positive integer", value)


def _boolean(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        _fail(key, "true or false", value)


def _choice(value: Any, options: tuple, key: str) -> str:
    if value not in options:
        _fail(key, "one of " + ", ".join(options), value)
    return value


def _number(value: Any, key: str, low: float, high: float = float("inf"),
            low_open: bool = False, high_open: bool = False, expected: str = "") -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    in_range = is_number and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if not in_range:
        if not expected:
            left = "(" if low_open else "["
            right = ")" if high_open or high == float("inf") else "]"
            expected = f"a number in {left}{low:g}, {high:g}{right}"
        _fail(key, expected, value)
